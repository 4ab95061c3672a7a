# syntax=docker/dockerfile:1
#
# credential-broker container image.
#
# Build stage: installs the package (the same `pip install .` the README uses) into a
# self-contained virtualenv at /opt/venv. The generated gRPC stubs are committed under
# broker/_proto, so no code generator (grpcio-tools, protoc) is needed here either.
#
# Runtime stage: python:3.11-slim plus that venv and nothing else -- no compilers, no code
# generators, no pip. Runs as the fixed non-root uid/gid 10001 and works with a read-only
# root filesystem: the only writable paths are the volumes for data and the socket.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Optional parts built in: root key sources for a wrapped keyring (aws, pkcs11) and OpenTelemetry
# tracing (otel). Each is imported only when the config turns it on. Empty: the bare package.
ARG BROKER_EXTRAS=aws,pkcs11,otel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".${BROKER_EXTRAS:+[${BROKER_EXTRAS}]}" \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/python -m pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# No pip in the final image: remove the base image's own pip (python:3.11-slim has one on PATH)
# and the pip wheels ensurepip would install.
RUN groupadd --system --gid 10001 credential-broker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin credential-broker \
    && mkdir -p /etc/credential-broker /var/lib/credential-broker /var/run/credential-broker \
    && chown 10001:10001 /var/lib/credential-broker /var/run/credential-broker \
    && chmod 0750 /var/lib/credential-broker \
    && if python -m pip --version >/dev/null 2>&1; then python -m pip uninstall --yes --quiet pip; fi \
    && rm -f /usr/share/python-wheels/pip-*.whl /usr/local/lib/python3*/ensurepip/_bundled/pip-*.whl
COPY --from=build /opt/venv /opt/venv
# Data (sqlite store) and the unix socket live on volumes, so the root filesystem can be
# mounted read-only. The configuration and keyring are mounted read-only into
# /etc/credential-broker by the orchestrator (ConfigMap and Secret on Kubernetes).
VOLUME ["/var/lib/credential-broker", "/var/run/credential-broker"]
# gRPC health-only listener (config key `health_listen`), used by Kubernetes gRPC probes.
EXPOSE 8086
USER 10001:10001
ENTRYPOINT ["credential-broker"]
CMD ["serve", "--config", "/etc/credential-broker/config.yaml"]
