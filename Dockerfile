# syntax=docker/dockerfile:1
#
# artStore Ingester image:  docker build -t artstore-ingester:0.1.0 .
# Without a Docker engine or a registry: `make image` builds this file unchanged with podman
# on a local Debian base passed as PYTHON_IMAGE (deploy/image/, deploy/README.md).
#
# Two stages: `builder` turns the project and every dependency into wheels (compilers exist
# there only, for a dependency without a wheel for the platform); `runtime` is a slim Python
# that installs those wheels and nothing else: no compiler, no build tools, no source tree.
# tests/deploy/ checks this file against the code (entry point, port, probe path, user).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from pyproject's pinned list: a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip wheel --wheel-dir /wheels -r requirements.txt
COPY README.md ./
COPY ingester ./ingester
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="artstore-ingester" \
      org.opencontainers.image.description="artStore Ingester: streaming upload front door for Storage Elements"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    INGESTER_SPOOL_DIR=/var/lib/ingester/spool
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be
# chowned to it. The directories exist in the image owned by that user: a named volume
# mounted on one of them starts with this owner (spool; data for the reference Storage
# Element; keys and public for the try-it stack's generated key pair, see deploy/).
RUN groupadd --system --gid 10001 ingester \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ingester --no-create-home \
        --shell /usr/sbin/nologin ingester \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/ingester /var/lib/ingester/spool \
        /var/lib/ingester/data /etc/ingester/public \
 && install -d -o 10001 -g 10001 -m 0700 /etc/ingester/keys
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels artstore-ingester
USER 10001:10001
WORKDIR /var/lib/ingester
VOLUME ["/var/lib/ingester/spool"]
EXPOSE 8020
STOPSIGNAL SIGTERM
# Liveness only (the process answers); readiness depends on Storage Elements and belongs
# to the orchestrator's probe. No curl in the slim image: Python's urllib, proxies ignored.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/health/live' % os.environ.get('INGESTER_PORT', '8020'), timeout=4)"]
# Exec form, no shell in between: SIGTERM reaches `ingester serve`, which drains uploads.
ENTRYPOINT ["ingester"]
CMD ["serve"]
