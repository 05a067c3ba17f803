# syntax=docker/dockerfile:1
# The projectionist image: `projectionist worker`, `migrate`, `api`, `status` ...
# Multi-stage: the build stage makes a virtualenv, the final stage copies only
# that virtualenv and runs as an unprivileged user (uid 10001). The default
# target is the last stage, `runtime`; `--target loadtest` adds Locust.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/projectionist
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/projectionist/bin/pip install . \
    && /opt/projectionist/bin/projectionist --version

# What every final image shares: the unprivileged user and the environment.
FROM ${PYTHON_IMAGE} AS base
LABEL org.opencontainers.image.title="projectionist" \
      org.opencontainers.image.description="Gap-safe, partitioned projection workers for an event store on PostgreSQL" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 projectionist \
    && useradd --system --uid 10001 --gid projectionist --create-home \
       --home-dir /home/projectionist --shell /usr/sbin/nologin projectionist
ENV PATH=/opt/projectionist/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/projectionist

# The compose "load" profile's Locust: the application plus Locust and loadtest/.
FROM build AS loadtest-build
COPY loadtest ./loadtest
RUN /opt/projectionist/bin/pip install ".[load]"

FROM base AS loadtest
COPY --from=loadtest-build /opt/projectionist /opt/projectionist
COPY --from=loadtest-build /src/loadtest /home/projectionist/loadtest
USER 10001:10001
# 8089: Locust's web UI. 9646: its Prometheus exporter.
EXPOSE 8089 9646
CMD ["locust", "-f", "loadtest/locustfile.py"]

# The application image (default target).
FROM base AS runtime
COPY --from=build /opt/projectionist /opt/projectionist
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 9100: a worker's /metrics, /healthz, /readyz (METRICS_PORT). 8000: the append API.
EXPOSE 9100 8000
CMD ["projectionist", "worker"]
