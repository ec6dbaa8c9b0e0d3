# qwen-grpc serving image: CPU-only PyTorch, runs as a non-root user, works with
# a read-only root filesystem (only /tmp must be writable: mount a tmpfs or an
# emptyDir there).
#
# The build installs from wheels that were downloaded on the host, so it needs
# no package index (and no network at all when MODEL_FETCH=false):
#
#   make docker-wheels        # pip wheel into build/docker-wheels/ (+ requirements.txt)
#   docker build -t qwen-grpc:0.1.0 .
#       -> bakes the model into /models (MODEL_FETCH=true, the default: runs
#          qwen-fetch-model during the build, which needs PyPI access)
#   docker build --build-arg MODEL_FETCH=false -t qwen-grpc:0.1.0-nomodel .
#       -> no model inside; mount a model folder at
#          /models/Qwen2.5-Coder-0.5B-Instruct (or anywhere, and set QWEN_MODEL)
#
# Settings come from QWEN_* environment variables (every `qwen-serve --flag`
# has one) or from arguments appended to `docker run IMAGE`.
# Legacy-builder compatible on purpose (no heredocs, no RUN --mount), so it
# builds on Debian's docker.io without buildx.

ARG BASE_IMAGE=python:3.11-slim

# --- deps: a venv with the pinned runtime dependencies (torch & co.) ---------
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
# build/docker-wheels/ holds the wheels and requirements.txt (the runtime
# dependencies pinned by requirements.lock, see runtime_requirements.py):
# changes to dev-only pins leave this layer cached.
COPY build/docker-wheels/ /wheels/
RUN /opt/venv/bin/pip install --no-index --find-links /wheels -r /wheels/requirements.txt \
 # CPU-only torch: a CUDA build would add gigabytes and nothing that runs here.
 && /opt/venv/bin/python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build' if torch.version.cuda else 0)" \
 && if /opt/venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo 'nvidia-* wheels in the image' >&2; exit 1; fi

# --- project: the qwen-grpc package alone, under /project-root/opt/venv ------
# Installed with --root so the runtime stage copies it as a small layer of its
# own: editing service/ rebuilds megabytes, not the 1 GB dependency layer.
# service/ carries the AVX2 int5/int8 kernels built on the host by `make setup`
# (service/engine/native/_int8_matmul.so; the image has no compiler). Without
# them, or on another CPU, `auto` takes int8 on torch's kernel.
FROM deps AS project
# README.md is optional (pyproject names it; the glob keeps COPY valid without it).
COPY pyproject.toml README.md* /src/
COPY service/ /src/service/
COPY clients/python/ /src/clients/python/
RUN /opt/venv/bin/pip install --no-index --no-deps --no-build-isolation --root /project-root /src/clients/python /src \
 && PYTHONPATH=/project-root/opt/venv/lib/python3.11/site-packages /opt/venv/bin/python -m service.cli --help > /dev/null

# --- model: baked in when MODEL_FETCH=true, else an empty /models ------------
# Only the files the fetch needs are copied, so editing the server's code does
# not download and convert the model again.
FROM deps AS model
ARG MODEL_FETCH=true
COPY service/__init__.py service/config.py service/model_fetch.py /src/service/
COPY service/engine/__init__.py service/engine/config.py service/engine/loader.py service/engine/weight_cache.py /src/service/engine/
RUN mkdir -p /models \
 && if [ "$MODEL_FETCH" = "true" ]; then \
      cd /src && HF_HUB_OFFLINE=1 /opt/venv/bin/python -m service.model_fetch --cache-dir /tmp/qwen-fetch \
      && mv /tmp/qwen-fetch/models/Qwen2.5-Coder-0.5B-Instruct /models/ \
      && rm -rf /tmp/qwen-fetch; \
    fi \
 # save_pretrained writes the weights 0600: make them readable by the runtime user.
 && chmod -R a+rX,go-w /models

# --- packed: the runner's quantized weights, packed once at build time -------
# For each kernel that the default `--quantization auto` may pick on the node.
# A replica then reads them (service/engine/weight_cache.py) instead of
# quantizing at every start: scale-out is that much faster. The cache key holds
# the model files' sizes and mtimes; this stage and the runtime copy /models
# from the same layer, so they see the same files. Empty without a baked model.
FROM deps AS packed
COPY --from=project /project-root/opt/venv /opt/venv
COPY --from=model /models /models
RUN mkdir -p /packed \
 && if [ -d /models/Qwen2.5-Coder-0.5B-Instruct ]; then \
      for kernel in int5 int8 int8-weight-only; do \
        HF_HUB_OFFLINE=1 /opt/venv/bin/python -m service.engine.weight_cache \
          --model /models/Qwen2.5-Coder-0.5B-Instruct --dtype bfloat16 --quantization $kernel --weight-cache-dir /packed; \
      done; \
    fi \
 && chmod -R a+rX,go-w /packed

# --- runtime ----------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="qwen-grpc" \
      org.opencontainers.image.description="gRPC serving of Qwen2.5-Coder-0.5B-Instruct on CPU" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it; no home,
# no login shell.
RUN groupadd --system --gid ${APP_UID} qwen \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin qwen
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /project-root/opt/venv /opt/venv
COPY --from=model /models /models
COPY --from=packed /packed /models/packed
# Everything that might want to write goes under /tmp (the only writable path
# with a read-only root filesystem); the image never talks to a model hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    PIP_CACHE_DIR=/tmp/.cache/pip \
    QWEN_CACHE_DIR=/tmp/.cache/qwen-grpc \
    # The packed weights baked in above (bfloat16; int5, int8, int8-weight-only). With a model
    # mounted over /models, point this at a writable volume to keep them.
    QWEN_WEIGHT_CACHE_DIR=/models/packed \
    QWEN_MODEL=/models/Qwen2.5-Coder-0.5B-Instruct \
    QWEN_HOST=0.0.0.0 \
    QWEN_GRPC_PORT=50051
USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
EXPOSE 50051
# For `docker run`; Kubernetes ignores this and uses the chart's gRPC probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD grpcurl -plaintext -max-time 2 -d '{"service":"qwen.QwenService"}' "127.0.0.1:${QWEN_GRPC_PORT}" \
      grpc.health.v1.Health/Check | grep -q '"SERVING"'
ENTRYPOINT ["qwen-serve"]
