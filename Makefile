# execbox toolbox (RAGFlow's sandbox Makefile, without Docker).
#
#   make            setup + build + start + test
#   make start      install what is missing, build the runtimes, run the service on :$(PORT)
#   make test       install what is missing, run the whole test suite
#   make image      build the container image execbox:latest (`docker compose up -d` runs it)
#   make install-service   install the systemd unit that runs this clone's service
#
# Every target is idempotent: running it twice is safe and the second run is quick.
# Meant for Debian/Ubuntu, as root (the namespaces backend needs root for cgroups and
# per-sandbox uids). `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := all
.NOTPARALLEL:
MAKEFLAGS += --no-print-directory

# The system interpreter on purpose: `python3` on PATH may be a pyenv shim.
PYTHON      := /usr/bin/python3
VENV        := .venv
VENV_STAMP  := $(VENV)/.execbox-installed
RUN_DIR     := run
PID_FILE    := $(RUN_DIR)/execbox.pid
LOG_FILE    := $(RUN_DIR)/execbox.log
START_TIMEOUT_S ?= 120
STOP_TIMEOUT_S  ?= 60
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Port: SANDBOX_EXECUTOR_MANAGER_PORT from the environment, else from .env, else 9385
# (the precedence the service itself applies). `make start PORT=9400` overrides all.
_dotenv = $(shell sed -n -E 's/^[[:space:]]*(export[[:space:]]+)?$(1)[[:space:]]*=[[:space:]]*["'"'"']?([^"'"'"'[:space:]]*).*/\2/p' .env 2>/dev/null | tail -n 1)
PORT := $(or $(SANDBOX_EXECUTOR_MANAGER_PORT),$(call _dotenv,SANDBOX_EXECUTOR_MANAGER_PORT),9385)
BIND_HOST := $(or $(SANDBOX_BIND_HOST),$(call _dotenv,SANDBOX_BIND_HOST),0.0.0.0)
HEALTH_HOST := $(if $(filter 0.0.0.0 :: [::],$(BIND_HOST)),127.0.0.1,$(BIND_HOST))
HEALTH_URL := http://$(HEALTH_HOST):$(PORT)/healthz

# Debian packages the backends need: package -> a file that proves it is installed.
REQUIRED_PACKAGES := bubblewrap:/usr/bin/bwrap util-linux:/usr/bin/prlimit curl:/usr/bin/curl
# ... and the multi-replica test's (tests/api/test_multi_replica.py): a reverse proxy, a Redis
REQUIRED_PACKAGES += haproxy:/usr/sbin/haproxy redis-server:/usr/bin/redis-server
# ... and the egress tests' (tests/contract/egress_host.py): a test host in a network namespace
REQUIRED_PACKAGES += iproute2:/usr/sbin/ip openssl:/usr/bin/openssl
# runsc (gVisor) is optional: without it the service falls back to the namespaces backend.
# A runsc is good enough when it offers the systrap platform and starts a sandbox on it
# (Debian 12's own runsc, of 2022, does not: its sandboxes cannot hold the two walls);
# otherwise, on Debian 12, `make setup` installs the current one from bookworm-backports,
# pinned so that nothing else comes from there.
RUNSC_OK = [ -x /usr/bin/runsc ] && timeout 10 /usr/bin/runsc help platforms 2>/dev/null | grep -qx systrap \
           && timeout 60 /usr/bin/runsc --root /run/execbox-runsc-probe --network=none --platform=systrap do /bin/true >/dev/null 2>&1
BACKPORTS_LIST := /etc/apt/sources.list.d/execbox-bookworm-backports.list
BACKPORTS_PIN  := /etc/apt/preferences.d/execbox-runsc

ifeq ($(shell id -u),0)
SUDO :=
else
SUDO := $(shell command -v sudo 2>/dev/null)
endif

# $(call running,PID): true when PID is a live process (not a zombie).
running = { [ -n "$(1)" ] && kill -0 $(1) 2>/dev/null && [ "$$(sed 's/.*) //' /proc/$(1)/stat 2>/dev/null | cut -d' ' -f1)" != Z ]; }
# $(call alive,PID): true when PID is a live execbox process (guards against a stale pid file).
alive = { $(call running,$(1)) && grep -qa execbox /proc/$(1)/cmdline 2>/dev/null; }

.PHONY: all help setup system-packages venv ensure_env ensure_uv build start stop restart status \
        test logs clean distclean bench

all: setup build start test ## setup, build, start, test

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

# -- setup ---------------------------------------------------------------------------

setup: system-packages venv ## install missing system packages; create .venv with execbox and its dev tools

system-packages:
	@missing=""; optional=""; \
	for entry in $(REQUIRED_PACKAGES); do \
	  [ -e "$${entry#*:}" ] || missing="$$missing $${entry%%:*}"; \
	done; \
	for pkg in python3-venv libseccomp2; do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$pkg"; \
	done; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	if [ ! -x /usr/bin/node ]; then missing="$$missing nodejs"; [ -x /usr/bin/npm ] || missing="$$missing npm"; \
	elif [ ! -x /usr/bin/npm ]; then missing="$$missing npm"; fi; \
	$(RUNSC_OK) || optional="runsc"; \
	if [ -z "$$missing$$optional" ]; then echo "setup: system packages present"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "setup: missing:$$missing$$optional; install them with your package manager (apt-get not found)" >&2; \
	  [ -z "$$missing" ]; exit; \
	fi; \
	if [ "$$(id -u)" != 0 ] && [ -z "$(SUDO)" ]; then \
	  echo "setup: missing:$$missing$$optional; run as root (or install them: apt-get install$$missing$$optional)" >&2; \
	  [ -z "$$missing" ]; exit; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	echo "setup: installing$$missing$$optional"; \
	$(SUDO) apt-get update -qq; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi; \
	if [ -n "$$optional" ] && grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then \
	  echo "setup: installing runsc (gVisor) from bookworm-backports (only runsc is taken from there)"; \
	  grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ \
	    || echo 'deb http://deb.debian.org/debian bookworm-backports main' | $(SUDO) tee $(BACKPORTS_LIST) >/dev/null; \
	  printf 'Package: *\nPin: release n=bookworm-backports\nPin-Priority: 100\n\nPackage: runsc\nPin: release n=bookworm-backports\nPin-Priority: 990\n' \
	    | $(SUDO) tee $(BACKPORTS_PIN) >/dev/null; \
	  $(SUDO) apt-get update -qq; \
	fi; \
	if [ -n "$$optional" ]; then \
	  $(SUDO) apt-get install -y -qq --no-install-recommends $$optional \
	    || echo "setup: could not install$$optional (optional: gVisor backend); the namespaces backend will be used" >&2; \
	  $(RUNSC_OK) || echo "setup: this runsc cannot hold two walls (no working systrap platform); the gvisor backend will run single-use sandboxes or the namespaces backend will be used; see README: Installing gVisor" >&2; \
	fi

venv:
	@if ! $(VENV)/bin/python -c '' 2>/dev/null; then \
	  echo "setup: creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	fi; \
	want="$$(sha256sum pyproject.toml | cut -d' ' -f1)"; \
	where="$$(cd / && $(CURDIR)/$(VENV)/bin/python -I -c 'import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec("execbox").origin)))' 2>/dev/null || true)"; \
	if [ "$$(cat $(VENV_STAMP) 2>/dev/null)" = "$$want" ] && [ "$$where" = "$(CURDIR)" ]; then \
	  echo "setup: $(VENV) up to date (pyproject.toml unchanged since the last install)"; \
	else \
	  echo "setup: pip install -e '.[dev]' into $(VENV)"; \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'; \
	  echo "$$want" > $(VENV_STAMP); \
	fi

ensure_env: ## create .env from .env.example if missing
	@if [ -f .env ]; then echo "ensure_env: .env exists"; else cp .env.example .env && echo "ensure_env: created .env from .env.example"; fi

ensure_uv: ## no-op: execbox uses pip in .venv, uv is not needed
	@echo "ensure_uv: uv is not needed; execbox installs with pip into $(VENV) (make setup)"

# -- build and run -------------------------------------------------------------------

build: setup ## build the runtime environments (packages for sandboxed code)
	@$(VENV)/bin/execbox build

start: setup build ensure_env ## run the service in the background; returns once /healthz is ok
	@mkdir -p $(RUN_DIR); \
	pid="$$(cat $(PID_FILE) 2>/dev/null || true)"; \
	if $(call alive,$$pid); then \
	  if curl -fsS -o /dev/null --max-time 2 $(HEALTH_URL) 2>/dev/null; then \
	    echo "start: execbox is already running (pid $$pid) and healthy at $(HEALTH_URL)"; exit 0; \
	  fi; \
	  echo "start: execbox (pid $$pid) is running but not healthy yet; waiting"; \
	else \
	  rm -f $(PID_FILE); \
	  if curl -sS -o /dev/null --max-time 2 $(HEALTH_URL) 2>/dev/null; then \
	    echo "start: port $(PORT) already answers but not from a service started here; stop it or set SANDBOX_EXECUTOR_MANAGER_PORT" >&2; \
	    exit 1; \
	  fi; \
	  echo "=== make start $$(date -Is) port $(PORT) ===" >> $(LOG_FILE); \
	  ( exec setsid $(VENV)/bin/execbox serve --port $(PORT) >>$(LOG_FILE) 2>&1 </dev/null ) & \
	  pid=$$!; echo "$$pid" > $(PID_FILE); \
	  echo "start: execbox starting (pid $$pid, log $(LOG_FILE)); waiting for $(HEALTH_URL)"; \
	fi; \
	deadline=$$((SECONDS + $(START_TIMEOUT_S))); \
	while :; do \
	  if curl -fsS -o /dev/null --max-time 2 $(HEALTH_URL) 2>/dev/null; then \
	    echo "start: execbox is up on port $(PORT) (pid $$pid) after $${SECONDS}s"; exit 0; \
	  fi; \
	  if ! $(call running,$$pid); then \
	    echo "start: execbox exited during start-up; last lines of $(LOG_FILE):" >&2; \
	    tail -n 40 $(LOG_FILE) >&2; rm -f $(PID_FILE); exit 1; \
	  fi; \
	  if [ $$SECONDS -ge $$deadline ]; then \
	    echo "start: $(HEALTH_URL) not ok after $(START_TIMEOUT_S)s; stopping it. Last lines of $(LOG_FILE):" >&2; \
	    tail -n 40 $(LOG_FILE) >&2; curl -sS --max-time 2 $(HEALTH_URL) >&2 || true; echo >&2; \
	    kill -TERM $$pid 2>/dev/null || true; sleep 5; kill -KILL $$pid 2>/dev/null || true; \
	    rm -f $(PID_FILE); exit 1; \
	  fi; \
	  sleep 0.2; \
	done

stop: ## stop the service (SIGTERM: running executions finish, every sandbox is destroyed)
	@pid="$$(cat $(PID_FILE) 2>/dev/null || true)"; \
	if ! $(call alive,$$pid); then echo "stop: execbox is not running"; rm -f $(PID_FILE); exit 0; fi; \
	kill -TERM $$pid; deadline=$$((SECONDS + $(STOP_TIMEOUT_S))); \
	while $(call alive,$$pid); do \
	  if [ $$SECONDS -ge $$deadline ]; then \
	    echo "stop: pid $$pid still running after $(STOP_TIMEOUT_S)s; sending SIGKILL (the next start reaps its sandboxes)" >&2; \
	    kill -KILL $$pid 2>/dev/null || true; sleep 1; break; \
	  fi; \
	  sleep 0.2; \
	done; \
	rm -f $(PID_FILE); echo "stop: execbox (pid $$pid) stopped"

restart: ## stop, then start
	@$(MAKE) stop
	@$(MAKE) start

status: ## say whether the service runs and print /healthz
	@pid="$$(cat $(PID_FILE) 2>/dev/null || true)"; \
	if $(call alive,$$pid); then echo "execbox running (pid $$pid)"; curl -sS --max-time 2 $(HEALTH_URL) || true; echo; \
	else echo "execbox is not running"; exit 1; fi

logs: ## follow the service's log
	@mkdir -p $(RUN_DIR); touch $(LOG_FILE); tail -n 100 -F $(LOG_FILE)

# -- checks --------------------------------------------------------------------------

test: setup build ## run the whole test suite (tests/); PYTEST_ARGS="..." passes options
	@rc=0; $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test: pytest collected no tests (exit 5); that is a failure" >&2; exit 1; fi; \
	exit $$rc

bench: start ## measure latency and throughput against the running service (BENCH_ARGS="...")
	@[ -f bench/run.py ] || { echo "bench: bench/run.py is missing" >&2; exit 1; }
	$(VENV)/bin/python bench/run.py --url http://$(HEALTH_HOST):$(PORT) $(BENCH_ARGS)

# -- cleaning ------------------------------------------------------------------------

clean: stop ## stop the service; remove ./run and caches (keeps .venv and the runtimes)
	@rm -rf $(RUN_DIR) .pytest_cache .import_linter_cache
	@find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	@echo "clean: removed $(RUN_DIR)/ and caches"

distclean: clean ## clean, and remove .venv too (runtimes under SANDBOX_STATE_DIR stay)
	@rm -rf $(VENV) *.egg-info
	@echo "distclean: removed $(VENV)"

# -- deployment ----------------------------------------------------------------------

IMAGE ?= execbox:latest
BASE_IMAGE := debian:bookworm-slim
SERVICE_UNIT := /etc/systemd/system/execbox.service

.PHONY: image install-service

image: ## build the container image (execbox:latest; IMAGE=... to name it); debian:bookworm-slim is built with debootstrap if it cannot be pulled
	@command -v docker >/dev/null || { echo "image: docker is missing: apt-get install docker.io" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "image: no Docker engine answers: start one (systemctl start docker, or dockerd &)" >&2; exit 1; }
	@docker/debian-base-image.sh $(BASE_IMAGE)
	@echo "image: building $(IMAGE) (a few minutes the first time)"
	@docker build --quiet --force-rm --build-arg EXTRA_CA_CERTS="$$($(PYTHON) docker/extra-ca-certs.py)" -t $(IMAGE) . >/dev/null
	@echo "image: $(IMAGE) built ($$(docker image inspect --format '{{.Size}}' $(IMAGE) | awk '{printf "%.0f MB", $$1/1e6}')); docker compose up -d runs it"

install-service: setup build ensure_env ## install the systemd unit (contrib/systemd/execbox.service) running .venv/bin/execbox serve from this clone
	@mkdir -p $(dir $(SERVICE_UNIT))
	@sed 's|@EXECBOX_DIR@|$(CURDIR)|g' contrib/systemd/execbox.service > $(SERVICE_UNIT).tmp
	@mv $(SERVICE_UNIT).tmp $(SERVICE_UNIT)
	@echo "install-service: installed $(SERVICE_UNIT) (execbox from $(CURDIR), settings from $(CURDIR)/.env)"
	@if [ -d /run/systemd/system ]; then \
	  systemctl daemon-reload && systemctl enable execbox.service && \
	  echo "install-service: enabled; start it with: systemctl start execbox (stop a 'make start' service first: make stop)"; \
	else \
	  echo "install-service: systemd is not running here; the unit will be used when it is"; \
	fi
