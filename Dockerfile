# syntax=docker/dockerfile:1
# Conveyor: one image for every role (AP_CONTAINER_TYPE = WORKER_AND_APP | APP | WORKER).
#
#   docker build -t conveyor .
#   docker run --env-file configs/conveyor.env -p 8080:8080 conveyor
#
# Worker containers (WORKER and WORKER_AND_APP) run code steps inside bubblewrap, the default
# AP_EXECUTION_MODE=SANDBOX_CODE_ONLY. As this image's non-root user, bubblewrap needs
# unprivileged user namespaces and an unmasked /proc, which Docker's defaults refuse:
#   docker run --security-opt seccomp=configs/seccomp/conveyor-worker.json \
#              --security-opt systempaths=unconfined --security-opt apparmor=unconfined ...
# (see configs/README.md, "Sandbox requirements"; the compose files and the Helm chart set it).
# Without them a worker with external Redis/PostgreSQL refuses to start and says why.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: wheels + compilers
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Compilers only here, for any dependency without a wheel for this platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY conveyor ./conveyor
RUN pip install --prefix=/install .

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="conveyor" \
      org.opencontainers.image.description="Workflow-automation engine: webhooks, Redis Streams queue, sandboxed workers, PostgreSQL"
# bubblewrap: the sandbox of code steps; tini: PID 1 that forwards signals and reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
RUN groupadd --system --gid 10001 conveyor \
 && useradd --system --uid 10001 --gid conveyor --home-dir /var/lib/conveyor \
            --shell /usr/sbin/nologin conveyor \
 && install -d -o conveyor -g conveyor -m 0700 /var/lib/conveyor
ENV AP_HOST=0.0.0.0 \
    AP_CONFIG_PATH=/var/lib/conveyor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/conveyor
USER 10001:10001
# 8080: API, webhooks and board (WORKER_AND_APP, APP); 9090: health + metrics of a WORKER.
EXPOSE 8080 9090
# /healthz on the port of the role: AP_METRICS_PORT for a WORKER, AP_PORT otherwise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; e = os.environ.get; worker = (e('AP_CONTAINER_TYPE') or '').strip().upper() == 'WORKER'; port = (e('AP_METRICS_PORT') or '9090') if worker else (e('AP_PORT') or '8080'); urllib.request.urlopen('http://127.0.0.1:%s/healthz' % port.strip(), timeout=4)"
# Runs drain on SIGTERM (allow 60-90 s: docker stop -t 90, stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "conveyor"]
CMD ["up"]
