# execbox: RAGFlow's sandbox executor manager (POST /run on :9385), without Docker-in-Docker.
#
#   docker build -t execbox .          (or: make image)
#   docker compose up -d               (see docker-compose.yml for the capabilities it needs)
#
# Three stages on one Debian base, so that the interpreters the runtimes were built with
# are byte for byte the ones that run them:
#   system   what the service needs at run time: python3, nodejs, bubblewrap, runsc, tini
#   builder  + python3-venv, npm: execbox's venv and the sandboxes' runtime environments
#            (`execbox build`: numpy/pandas/matplotlib/requests, npm axios)
#   final    system + the two built trees + npm from the registry in /opt/npm (Debian's npm
#            brings 140 MB of node-* packages): npm and the service venv's pip install packages
#            per request (SANDBOX_PACKAGES), outside the sandboxes; no pip in the sandboxes'
#            venv, no compilers, and none of the packages' own test suites (pandas/tests alone is 39 MB).
#
# Behind a TLS-intercepting proxy, give its CA to the build stage only:
#   docker build --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)" -t execbox .
# (`make image` and tests/deploy pass the CAs this host trusts beyond Debian's own).

FROM debian:bookworm-slim AS system
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8
# runsc (gVisor) comes from bookworm-backports, and nothing else does: the pin keeps every
# other package on bookworm.
RUN echo 'deb http://deb.debian.org/debian bookworm-backports main' \
        > /etc/apt/sources.list.d/bookworm-backports.list \
 && printf '%s\n' \
        'Package: *' 'Pin: release n=bookworm-backports' 'Pin-Priority: 100' '' \
        'Package: runsc' 'Pin: release n=bookworm-backports' 'Pin-Priority: 990' \
        > /etc/apt/preferences.d/execbox-runsc \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 nodejs bubblewrap libseccomp2 runsc tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

FROM system AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# (declared after the layers above, so that a change of CA keeps them cached)
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra-ca.crt \
        && update-ca-certificates >/dev/null; \
    fi
# Build stage only: pip and npm verify TLS against the system's store (with the extra CAs).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    npm_config_update_notifier=false

# Layers from the least to the most often changed: execbox's dependencies, the sandboxes'
# packages (downloaded once into /wheels and npm's cache), then execbox itself.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/execbox/venv \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/execbox-requirements.txt \
 && /opt/execbox/venv/bin/pip install --quiet -r /tmp/execbox-requirements.txt
COPY execbox/runtimes/python/requirements.txt /tmp/runtime-python/
RUN /opt/execbox/venv/bin/pip download --quiet --only-binary=:all: -d /wheels \
        -r /tmp/runtime-python/requirements.txt
RUN npm install --global --prefix /opt/npm --no-audit --no-fund --loglevel=error npm@10.8.2
COPY execbox/runtimes/nodejs/package*.json /tmp/runtime-nodejs/
RUN cd /tmp/runtime-nodejs && npm install --omit=dev --no-audit --no-fund --loglevel=error
COPY README.md /src/
COPY execbox /src/execbox
RUN /opt/execbox/venv/bin/pip install --quiet --no-deps /src \
 && PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels npm_config_prefer_offline=true \
        SANDBOX_STATE_DIR=/var/lib/execbox /opt/execbox/venv/bin/execbox build \
 && find /var/lib/execbox/runtimes/python/lib/python3*/site-packages -mindepth 2 -maxdepth 3 \
        -type d -name tests -prune -exec rm -rf {} +

FROM system
COPY --from=builder /opt/execbox /opt/execbox
COPY --from=builder /opt/npm /opt/npm
COPY --from=builder /var/lib/execbox/runtimes /var/lib/execbox/runtimes
COPY docker/entrypoint.sh /usr/local/bin/execbox-entrypoint
# The container listens on every address inside it (it must, to be reachable); which host
# address publishes it is the compose file's business (SANDBOX_BIND_HOST there).
ENV PATH=/opt/execbox/venv/bin:/opt/npm/bin:$PATH \
    SANDBOX_STATE_DIR=/var/lib/execbox \
    SANDBOX_BIND_HOST=0.0.0.0 \
    SANDBOX_EXECUTOR_MANAGER_PORT=9385
# execbox reads an optional .env from its working directory: mount one here if you like.
WORKDIR /etc/execbox
EXPOSE 9385
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('SANDBOX_EXECUTOR_MANAGER_PORT', '9385'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
# The entry point makes the container's own cgroup writable (sandboxes get cgroups below
# it), then runs execbox under tini, pid 1: it reaps the orphans sandboxes leave and passes
# SIGTERM on, so that running executions finish and every sandbox is destroyed on stop.
ENTRYPOINT ["/usr/local/bin/execbox-entrypoint"]
CMD ["serve"]
