# netmirror: `make demo` shows the main job end to end, `make test` runs the suite.
# Both install what they need on a fresh Debian machine (run as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEBIAN_PACKAGES := iproute2 iptables curl iperf3 socat procps tcpdump libpcap0.8 python3-venv \
	fuse3 libfuse3-dev pkg-config gcc python3-dev apache2-utils bind9-dnsutils
# Commands whose absence means the Debian packages above must be installed.
NEEDED_COMMANDS := ip iptables iptables-legacy curl iperf3 socat pgrep tcpdump fusermount3 gcc pkg-config ab dig

.PHONY: deps system-deps image-deps demo test lint bench clean agent-image

deps: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for c in $(NEEDED_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if ! $(PYTHON) -m venv --help >/dev/null 2>&1; then missing="$$missing python3-venv"; fi; \
	if ! pkg-config --exists fuse3 2>/dev/null; then missing="$$missing libfuse3-dev"; fi; \
	if [ ! -e "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then missing="$$missing python3-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root to install: $(DEBIAN_PACKAGES)"; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: deps
	$(PY) -m sandbox.demo

test: deps image-deps
	$(PY) -m pytest -q -rs tests

# make lint: style, types, and the import contracts of pyproject.toml (no process
# imports another's package; see docs/architecture.md).
lint: deps
	$(VENV)/bin/ruff check netmirror sandbox tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# make bench: the benchmark suite (benchmarks/suite.py): every scenario, side by side
# over direct, socat relay and netmirror paths; results in benchmarks/results/.
# Then the mirror-by-capture rate sweep (benchmarks/mirror.py), what each mirror method
# costs the pod's new connections (benchmarks/mirror_rate.py), the HTTP filter's
# cost for requests it does not steal (benchmarks/http_filter.py); benchmarks.throughput
# still runs on its own.
BENCH_PACKAGES := wrk iperf3 redis-server redis-tools socat nginx-light nghttp2-client postgresql apache2-utils
BENCH_COMMANDS := wrk iperf3 redis-server redis-benchmark socat nginx h2load pgbench ab

bench: deps
	@missing=""; for c in $(BENCH_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the benchmarks (missing:$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root to install: $(BENCH_PACKAGES)"; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_PACKAGES) >/dev/null; \
	fi
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) -m benchmarks.suite $(BENCH_ARGS)
	$(PY) -m benchmarks.mirror
	$(PY) -m benchmarks.mirror_rate
	$(PY) -m benchmarks.http_filter
	$(PY) -m benchmarks.files

# make agent-image: the agent's container image as a docker-archive tarball in
# build/agent-image/, built from Debian packages without Docker (agent_image/build.py);
# it prints the image reference and the archive's path. Unchanged inputs reuse the archive.
IMAGE_PACKAGES := mmdebstrap podman runc
IMAGE_COMMANDS := mmdebstrap podman runc

image-deps:
	@missing=""; for c in $(IMAGE_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the agent image (missing:$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root to install: $(IMAGE_PACKAGES)"; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(IMAGE_PACKAGES) >/dev/null; \
	fi

agent-image: deps image-deps
	$(PY) agent_image/build.py $(IMAGE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache benchmarks/results
