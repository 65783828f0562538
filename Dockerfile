# session-proxy: the exec sidecar. Build and publish: see the README's "Releases".
# Runs as a non-root numeric UID with a read-only root filesystem; the entry point needs no shell.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
# The dependencies come from the lock file, each pinned and checked against its hashes, so two
# builds of one commit install the same packages; the project itself is installed without them.
COPY requirements.lock ./
RUN python -m venv /opt/session-proxy \
 && /opt/session-proxy/bin/pip install --no-cache-dir --no-compile --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY session_proxy ./session_proxy
RUN /opt/session-proxy/bin/pip install --no-cache-dir --no-compile --no-deps . \
 && /opt/session-proxy/bin/pip check \
 && /opt/session-proxy/bin/python -m compileall -q /opt/session-proxy/lib

# The workspace supervisor: one static C program (musl), copied into each workspace pod by its
# init container (manifests/workspace-pod.yaml).
FROM python:3.11.11-slim-bookworm AS supervisor
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/*
COPY supervisor /src/supervisor
RUN /src/supervisor/build.sh /out/workspace-supervisor

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="session-proxy" \
      org.opencontainers.image.description="Localhost exec sidecar: runs an agent's commands in its workspace pod through the Kubernetes exec API" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/session-proxy /opt/session-proxy
COPY --from=supervisor /out/workspace-supervisor /opt/session-proxy/workspace-supervisor
ENV PATH="/opt/session-proxy/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SESSION_PROXY_LISTEN=127.0.0.1:8081 \
    SESSION_PROXY_OPS_LISTEN=0.0.0.0:9464 \
    SESSION_PROXY_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 8081 9464
ENTRYPOINT ["/opt/session-proxy/bin/session-proxy", "serve"]
