# syntax=docker/dockerfile:1
# Conveyor: one image for every role (AP_CONTAINER_TYPE = WORKER_AND_APP | APP | WORKER).
#
#   docker build -t conveyor .                      # anywhere Docker Hub is reachable
#   configs/container/build.sh                      # podman, no registry (configs/README.md)
#   docker run --env-file configs/conveyor.env -p 8080:8080 conveyor
#
# Base: Debian bookworm-slim with Debian's python3 (3.11) and Conveyor in a venv at /opt/venv
# (not /opt/conveyor: that is where the sandbox shows the package to code steps). Where no
# registry is reachable, configs/container/base.sh debootstraps the same base locally
# (BASE_IMAGE selects another base).
#
# Worker containers (WORKER and WORKER_AND_APP) run code steps inside bubblewrap, the default
# AP_EXECUTION_MODE=SANDBOX_CODE_ONLY. As this image's non-root user, bubblewrap needs
# unprivileged user namespaces and an unmasked /proc, which Docker's defaults refuse:
#   docker run --security-opt seccomp=configs/seccomp/conveyor-worker.json \
#              --security-opt systempaths=unconfined --security-opt apparmor=unconfined ...
# (podman: seccomp=… unmask=/proc/* [apparmor=unconfined]; see configs/README.md, "Sandbox
# requirements"; the compose files and the Helm chart set them).
# Without them a worker with external Redis/PostgreSQL refuses to start and says why.

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- deps: the venv
FROM ${BASE_IMAGE} AS deps
# Where pip must use another index or trust another CA (a TLS-intercepting proxy), pass them:
#   --build-arg PIP_INDEX_URL=… --secret id=pip_cert,src=<CA bundle> --build-arg PIP_CERT=/run/secrets/pip_cert
# (configs/container/build.sh passes the host's). The secret is mounted for the pip steps only.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Unpinned on purpose: versions come from the bookworm (and -security) suites of the base,
# and a pin would break the build at Debian's next point or security release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /src
# The dependencies (only setup.cfg invalidates this stage), all binary wheels: no compilers.
COPY setup.cfg ./
RUN --mount=type=secret,id=pip_cert \
    python3 -c "import configparser as c; p = c.ConfigParser(); p.read('setup.cfg'); print(p['options']['install_requires'])" > requirements.txt \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt \
 && /opt/venv/bin/pip check

# ---------------------------------------------------------------- build: Conveyor itself
FROM deps AS build
# Build args are per stage: the same pip settings as above.
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY pyproject.toml README.md ./
COPY conveyor ./conveyor
# Into a prefix of its own, laid out like the venv: the runtime stage copies it over the venv
# as a small layer of its own, so a code change leaves the dependency layer cached.
RUN --mount=type=secret,id=pip_cert \
    /opt/venv/bin/pip install --no-deps --no-warn-script-location --prefix=/opt/pkg . \
 && PYTHONPATH="$(echo /opt/pkg/lib/python3*/site-packages)" /opt/venv/bin/python -c "import conveyor.cli, conveyor.store.db"

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="conveyor" \
      org.opencontainers.image.description="Workflow-automation engine: webhooks, Redis Streams queue, sandboxed workers, PostgreSQL"
# python3: the venv's interpreter; bubblewrap: the sandbox of code steps; tini: PID 1 that
# forwards signals and reaps orphans; ca-certificates: HTTPS from flows.
# Unpinned on purpose, as above: pins break at Debian's next point or security release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 bubblewrap tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /opt/pkg/ /opt/venv/
RUN groupadd --system --gid 10001 conveyor \
 && useradd --system --uid 10001 --gid conveyor --home-dir /var/lib/conveyor \
            --shell /usr/sbin/nologin conveyor \
 && install -d -o conveyor -g conveyor -m 0700 /var/lib/conveyor
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    AP_HOST=0.0.0.0 \
    AP_CONFIG_PATH=/var/lib/conveyor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/conveyor
USER 10001:10001
# 8080: API, webhooks and board (WORKER_AND_APP, APP); 9090: health + metrics of a WORKER.
EXPOSE 8080 9090
# /healthz on the port of the role: AP_METRICS_PORT for a WORKER, AP_PORT otherwise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; e = os.environ.get; worker = (e('AP_CONTAINER_TYPE') or '').strip().upper() == 'WORKER'; port = (e('AP_METRICS_PORT') or '9090') if worker else (e('AP_PORT') or '8080'); urllib.request.urlopen('http://127.0.0.1:%s/healthz' % port.strip(), timeout=4)"]
# Runs drain on SIGTERM (allow 60-90 s: docker stop -t 90, stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "conveyor"]
CMD ["up"]
