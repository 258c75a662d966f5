# syntax=docker/dockerfile:1
#
# model-gateway container image.
#
#   docker build -t model-gateway .
#   docker run --rm -p 8080:8080 -e MLFLOW_TRACKING_URI=https://mlflow.example.com \
#       -v "$PWD/my-gateway.yaml:/etc/model-gateway/gateway.yaml:ro" model-gateway
#
# An air-gapped image that serves a bundle (frozen models, no registry; README "Bundles"):
#
#   model-gateway bundle --config my-gateway.yaml --out bundle
#   docker build --target bundle -t model-gateway-frozen .     # --build-arg BUNDLE=<dir>
#
# Stage 1 builds the project's wheel from this repository (not from an index) and
# installs it, with its dependencies from PyPI, into a virtualenv at /opt/model-gateway.
# Stage 2 (gateway) copies only that virtualenv onto a slim Python: no compiler, no
# sources. Stage 3 (bundle) adds a bundle to it; the last stage, the default image, is
# stage 2 as it is.
# The root filesystem may be read-only: everything written at run time goes under
# /var/cache/model-gateway, $HOME (/home/gateway) or /tmp; mount those writable.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# .dockerignore lets in only what the wheel needs (pyproject.toml, README, the packages).
COPY . .
RUN python -m venv /opt/model-gateway \
    && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && /opt/model-gateway/bin/pip install --no-cache-dir /dist/*.whl "uv==0.13.9"


FROM python:3.11-slim-bookworm AS gateway

# tini runs as PID 1 and reaps orphans. The gateway starts runner processes in their own
# sessions, and `mlflow models serve` (the cli launcher) starts grandchildren through
# bash; when a runner is stopped its grandchildren can be reparented to PID 1, and a
# gateway running as PID 1 would never reap them. tini forwards SIGTERM to the gateway
# only (not to its group), so the gateway still drains and stops its runners in order.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /home/gateway --create-home \
        --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0750 /var/cache/model-gateway \
    && install -d -m 0755 /etc/model-gateway

COPY --from=builder /opt/model-gateway /opt/model-gateway
# The demo config as a default: it reads MLFLOW_TRACKING_URI, MODEL_GATEWAY_HOST and
# MODEL_GATEWAY_PORT from the environment. Mount your own config over it.
COPY config/gateway.yaml /etc/model-gateway/gateway.yaml

# MLFLOW_ENV_ROOT and UV_CACHE_DIR: where `env_manager: uv|virtualenv` runners build
# the models' environments (the default would be under $HOME).
ENV PATH=/opt/model-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gateway \
    XDG_CACHE_HOME=/var/cache/model-gateway \
    MLFLOW_ENV_ROOT=/var/cache/model-gateway/mlflow-envs \
    UV_CACHE_DIR=/var/cache/model-gateway/uv \
    MODEL_GATEWAY_CONFIG=/etc/model-gateway/gateway.yaml \
    MODEL_GATEWAY_HOST=0.0.0.0 \
    MODEL_GATEWAY_PORT=8080

USER 10001:10001
WORKDIR /home/gateway
EXPOSE 8080

# curl is not in the slim image; Python's urllib is. Any error (refused, timeout, non-2xx)
# raises, and python exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MODEL_GATEWAY_PORT', '8080') + '/healthz', timeout=4)"]

# Exec form: SIGTERM from `docker stop` or the kubelet reaches tini, which passes it on.
ENTRYPOINT ["/usr/bin/tini", "--", "model-gateway"]
CMD ["serve"]


# The gateway with a bundle in it: every endpoint serves its frozen copy, env_manager
# local, with no registry to reach. BUNDLE is a directory of the build context (the
# .dockerignore lets in bundle/ only).
FROM gateway AS bundle
ARG BUNDLE=bundle
COPY ${BUNDLE} /srv/model-gateway/bundle
ENV MODEL_GATEWAY_BUNDLE=/srv/model-gateway/bundle \
    MODEL_GATEWAY_CONFIG=/srv/model-gateway/bundle/gateway.yaml


# The default image (a build without --target): the gateway, configured at run time.
FROM gateway
