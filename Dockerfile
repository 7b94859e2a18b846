# syntax=docker/dockerfile:1
# shardgate container image.
#
# Stage "build" (Debian 12) builds the wheels and installs them into a virtualenv at
# /opt/shardgate; the runtime stage copies that venv onto distroless Python: Debian 12's Python
# 3.11 (the minor version CI tests on), no shell, no package manager, fixed non-root UID 65532.
# Nothing is written outside /tmp at run time (bytecode is compiled at build time), so the
# container runs with a read-only root filesystem and a writable emptyDir on /tmp.
#
#   docker build -t shardgate:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 -v "$PWD/config:/config:ro" \
#       shardgate:0.1.0 run --config /config/local.yaml
#
# tests/deploy/test_image.py builds the same wheel from the same files (COPY lines below) and
# runs `shardgate --help` from it in a fresh venv; hadolint and checkov lint this file in CI.

FROM debian:12-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
# python3-venv (python3-defaults, pinned) brings Debian 12's Python 3.11: the interpreter the
# distroless runtime ships at the same path (/usr/bin/python3), which the venv links to.
# gcc (gcc-defaults) and python3-dev (its headers; libc6-dev comes with them) compile the data
# plane (setup.py); they stay in this stage: the runtime has no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv=3.11.2-1+b1 python3-dev=3.11.2-1+b1 \
        gcc=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway/ gateway/
# Wheels for shardgate (its data plane compiled: the build fails if a listed module is not) and
# every dependency, then a venv installed from those wheels only; pip itself is removed from
# the venv afterwards (nothing installs at run time).
RUN python3 -m venv /opt/shardgate \
    && /opt/shardgate/bin/pip wheel --wheel-dir /wheels . \
    && /opt/shardgate/bin/pip install --no-index --find-links /wheels /wheels/shardgate-*.whl \
    && /opt/shardgate/bin/python3 -I -c "from gateway.build import uncompiled_modules as u; m = u(); assert not m, m" \
    && /opt/shardgate/bin/pip uninstall -y pip setuptools \
    && /opt/shardgate/bin/python3 -m compileall -q /opt/shardgate/lib

FROM gcr.io/distroless/python3-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="shardgate" \
      org.opencontainers.image.description="Sharding HTTP gateway: strict write ownership over a consistent-hash ring of shard groups" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/python3-debian12:nonroot"
COPY --from=build /opt/shardgate /opt/shardgate
ENV PATH="/opt/shardgate/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# The UID/GID of distroless "nonroot"; deploy/base/deployment.yaml runs the pod as the same.
USER 65532:65532
# 8080: proxied traffic; 9090: admin (health, readiness, metrics, debug) - never expose it publicly.
EXPOSE 8080 9090
# For plain `docker run`; Kubernetes ignores HEALTHCHECK and uses the probes in deploy/base.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/shardgate/bin/python3", "-c", "import os, urllib.request; port = os.environ.get('SHARDGATE_ADMIN_LISTEN', ':9090').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["shardgate"]
CMD ["run"]
