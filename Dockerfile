# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t ghcr.io/moe-router-operator/operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/moe-router-operator/router-runtime:0.1.0 .
# Both run as the non-root uid 65532 with a read-only root filesystem (writable /tmp from an emptyDir).

# ---- shared base: pinned Python, no caches, no bytecode writes at run time (the root filesystem is read-only):
# pip byte-compiles what it installs in the build stages, so imports read .pyc instead of compiling at each start ----
FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- build stage: the project sources, copied once for both images ----
FROM base AS source
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY router_runtime/ router_runtime/
COPY operator/ operator/

# ---- operator build: kopf, kubernetes, Prometheus client; no torch ----
FROM source AS operator-build
RUN python -m venv /opt/venv \
 && pip install -c constraints.txt ".[operator]"

# ---- runtime build: CPU-only torch from the PyTorch CPU index, pinned by constraints.txt ----
FROM source AS runtime-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch \
 && pip install -c constraints.txt ".[runtime]"

# ---- final image: operator ----
FROM base AS operator
LABEL org.opencontainers.image.title="moe-router-operator" \
      org.opencontainers.image.description="Kubernetes operator for MoERouter objects (no torch)" \
      org.opencontainers.image.source="https://github.com/moe-router-operator/moe-router-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-build /opt/venv /opt/venv
ENV HOME=/tmp
WORKDIR /tmp
USER 65532:65532
# 8080: kopf liveness (/healthz); 9090: the operator's Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["moe-operator"]
CMD ["run", "--all-namespaces"]

# ---- final image: router runtime ----
FROM base AS runtime
LABEL org.opencontainers.image.title="moe-router-runtime" \
      org.opencontainers.image.description="Dynamic-expert MoE router behind the Open Inference Protocol v2 (CPU torch)" \
      org.opencontainers.image.source="https://github.com/moe-router-operator/moe-router-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=runtime-build /opt/venv /opt/venv
# No OMP_NUM_THREADS: `serve` sizes worker processes and torch threads from the pod's CPU limit (cgroup).
# Everything the runtime writes goes to the tmpfs at /tmp (read-only root filesystem): the multi-worker
# metrics files ($TMPDIR) and numba's compiled-kernel cache (shared by the workers of one pod).
ENV HOME=/tmp \
    TMPDIR=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba-cache
WORKDIR /tmp
USER 65532:65532
EXPOSE 8080
# Probes server.port's default; serving on another port under plain Docker, pass --health-cmd (docs/runtime.md).
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["moe-router"]
CMD ["serve"]
