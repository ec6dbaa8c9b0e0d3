"""Objects the kind end-to-end test creates besides the chart's (kept apart
so tests/deploy/test_kind_assets.py can validate them where kind is absent)."""

from __future__ import annotations


def client_job(name: str, image: str, client_args: list[str]) -> dict:
    """A Job running tests/kind/in_cluster_client.py (mounted from the
    ConfigMap `<name>-script`) with the server image, as hardened as the chart's pods."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        # The label lets a rerun on a reused cluster delete what an aborted run left.
        "metadata": {"name": name, "labels": {"qwen-grpc-e2e/client": "true"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "client",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "command": ["python", "/client/client.py", *client_args],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "volumeMounts": [
                                {"name": "script", "mountPath": "/client"},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "script", "configMap": {"name": f"{name}-script"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }
