{{/*
Expand the name of the chart.
*/}}
{{- define "qwen-grpc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "qwen-grpc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "qwen-grpc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "qwen-grpc.labels" -}}
helm.sh/chart: {{ include "qwen-grpc.chart" . }}
{{ include "qwen-grpc.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "qwen-grpc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-grpc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "qwen-grpc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwen-grpc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: the digest wins over the tag; the tag defaults to appVersion.
*/}}
{{- define "qwen-grpc.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the headless Service (the DNS name clients balance over).
*/}}
{{- define "qwen-grpc.headlessName" -}}
{{- printf "%s-headless" (include "qwen-grpc.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the API key Secret.
*/}}
{{- define "qwen-grpc.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "qwen-grpc.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/*
Torch threads: server.threads, else the CPU limit (else request) rounded
down, at least 1 (a thread beyond the CFS quota is throttled every step),
else empty (the server then counts the node's CPUs).
*/}}
{{- define "qwen-grpc.threads" -}}
{{- if .Values.server.threads }}
{{- .Values.server.threads }}
{{- else }}
{{- $cpu := "" }}
{{- with .Values.resources.requests }}{{ with .cpu }}{{ $cpu = toString . }}{{ end }}{{ end }}
{{- with .Values.resources.limits }}{{ with .cpu }}{{ $cpu = toString . }}{{ end }}{{ end }}
{{- if $cpu }}
{{- if hasSuffix "m" $cpu }}
{{- max 1 (int (floor (divf (float64 (trimSuffix "m" $cpu)) 1000))) }}
{{- else }}
{{- max 1 (int (floor (float64 $cpu))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain + shutdown margin, so
the kubelet never kills a replica that is still draining.
*/}}
{{- define "qwen-grpc.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.timeoutSeconds .Values.drain.shutdownMarginSeconds }}
{{- end }}

{{/*
Model folder as the server sees it.
*/}}
{{- define "qwen-grpc.modelPath" -}}
{{- printf "/models/%s" .Values.model.dirName }}
{{- end }}

{{/*
Checks that no template can express with the schema alone.
*/}}
{{- define "qwen-grpc.validate" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository is required: no public qwen-grpc image exists. Build it (`make docker-image`), push it to a registry your nodes pull from and set image.repository (and image.tag or image.digest)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the Deployment: KEDA makes its own HPA, enable one of them" }}
{{- end }}
{{- if and .Values.keda.enabled (not .Values.metrics.enabled) }}
{{- fail "keda.enabled needs metrics.enabled (its trigger queries the replicas' qwen_requests_* gauges in Prometheus)" }}
{{- end }}
{{- if and .Values.apiKeys.enabled (eq (toString .Values.settings.auth_public_health) "false") }}
{{- fail "settings.auth_public_health=false with apiKeys.enabled: the kubelet's gRPC probes send no key, so no pod would ever become ready" }}
{{- end }}
{{- if and .Values.grpcRoute.enabled (not .Values.grpcRoute.parentRefs) }}
{{- fail "grpcRoute.enabled needs grpcRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs ingress.hosts" }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.waitingRequests.enabled (not .Values.metrics.enabled) }}
{{- fail "autoscaling.waitingRequests needs metrics.enabled (the gauge comes from the metrics endpoint)" }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.keys) }}
{{- fail "apiKeys.enabled needs apiKeys.existingSecret or apiKeys.keys" }}
{{- end }}
{{- $grace := .Values.settings.max_connection_age_grace | default 600 }}
{{- if lt (float64 .Values.drain.timeoutSeconds) (float64 $grace) }}
{{- fail (printf "drain.timeoutSeconds (%v) is shorter than settings.max_connection_age_grace (%v): rollouts would cut streams the server lets run that long; raise the drain or lower the grace" .Values.drain.timeoutSeconds $grace) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.waitingRequests.enabled) }}
{{- fail "autoscaling.enabled needs a metric: targetCPUUtilizationPercentage or waitingRequests.enabled" }}
{{- end }}
{{- end }}

{{/*
Labels of the `helm test` pod: deliberately not matching selectorLabels.
*/}}
{{- define "qwen-grpc.testLabels" -}}
helm.sh/chart: {{ include "qwen-grpc.chart" . }}
app.kubernetes.io/name: {{ include "qwen-grpc.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
