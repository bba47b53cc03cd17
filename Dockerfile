# Agent Stream Gateway container image.
#
#   docker build -t agent-stream-gateway .
#   docker run -p 8080:8080 -p 8081:8081 -v gateway-data:/data \
#     -e UPSTREAM_URL=http://agent-server:8000 agent-stream-gateway
#
# Configuration: the image ships config/gateway.yaml as
# /etc/agent-gateway/gateway.yaml. It reads UPSTREAM_URL (the Agent Server to
# proxy, default http://127.0.0.1:2024) and GATEWAY_DATA_DIR (set to /data
# below). To use your own file, mount it over the shipped one:
#   docker run -v "$PWD/my-gateway.yaml:/etc/agent-gateway/gateway.yaml:ro" ...
# or mount it elsewhere and pass new flags (the entrypoint is `agent-gateway`,
# so arguments after the image name replace the CMD below):
#   docker run -v "$PWD/conf:/config:ro" ... agent-stream-gateway \
#     --config /config/gateway.yaml --host 0.0.0.0 --admin-host 0.0.0.0
# Flags win over the file; keep --host/--admin-host 0.0.0.0 so the listeners
# are reachable from outside the container. The HEALTHCHECK below assumes the
# admin port stays 8081.
#
# The event log lives in /data, a volume: keep it on persistent, local storage
# (LMDB needs a filesystem with working mmap and file locks, so not NFS/SMB), and
# never share one /data between two running gateways.

# The build stage compiles the C extension of the hot loops (gateway/_native.c) into a wheel;
# the image itself carries no compiler.
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile, glob; sys.exit(not any(n.endswith('.so') for w in glob.glob('/wheels/*.whl') for n in zipfile.ZipFile(w).namelist()))"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user that owns only the data directory.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /etc/agent-gateway \
    && chown gateway:gateway /data

# The package from the build stage's wheel; its dependencies (aiohttp, lmdb, orjson, ...) come
# as binary wheels.
COPY --from=build /wheels /tmp/wheels
COPY config/gateway.yaml /etc/agent-gateway/gateway.yaml
RUN pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

ENV GATEWAY_DATA_DIR=/data
VOLUME /data
WORKDIR /data
# The numeric id: it resolves the same on every host (and Kubernetes runAsNonRoot can check it).
USER 10001:10001

# 8080: the proxied Agent Server API. 8081: /healthz, /readyz, /metrics.
EXPOSE 8080 8081

# Liveness only (/healthz): an unreachable upstream must not get the gateway
# restarted, since it keeps serving resumes from the log. Use /readyz for
# load-balancer readiness instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]

# SIGTERM (docker stop) drains: client streams are cut at an event boundary (they resume), other
# requests get shutdown_grace (10s by default), then the log is closed. docker
# stop sends SIGKILL after 10s, so give it more than shutdown_grace:
# `docker stop -t 20`, or `stop_grace_period: 20s` in compose. (A SIGKILL loses
# no committed event, but in-flight plain requests are cut.)
STOPSIGNAL SIGTERM
ENTRYPOINT ["agent-gateway"]
CMD ["--config", "/etc/agent-gateway/gateway.yaml", "--host", "0.0.0.0", "--admin-host", "0.0.0.0"]
