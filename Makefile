# netmirror: `make demo` shows the main job end to end, `make test` runs the suite.
# Both install what they need on a fresh Debian machine (run as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEBIAN_PACKAGES := iproute2 iptables curl iperf3 socat procps tcpdump libpcap0.8 python3-venv
# Commands whose absence means the Debian packages above must be installed.
NEEDED_COMMANDS := ip iptables iptables-legacy curl iperf3 socat pgrep tcpdump

.PHONY: deps system-deps demo test lint bench clean agent-image

deps: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for c in $(NEEDED_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if ! $(PYTHON) -m venv --help >/dev/null 2>&1; then missing="$$missing python3-venv"; fi; \
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
	$(PY) -m netmirror.demo

test: deps
	$(PY) -m pytest -q -rs tests

lint: deps
	$(VENV)/bin/ruff check netmirror tests benchmarks
	$(VENV)/bin/mypy

# make bench: the benchmark suite (benchmarks/suite.py): every scenario, side by side
# over direct, socat relay and netmirror paths; results in benchmarks/results/.
# Then the mirror-by-capture rate sweep (benchmarks/mirror.py) and the HTTP filter's
# cost for requests it does not steal (benchmarks/http_filter.py); benchmarks.throughput
# still runs on its own.
BENCH_PACKAGES := wrk iperf3 redis-server redis-tools socat nginx-light
BENCH_COMMANDS := wrk iperf3 redis-server redis-benchmark socat nginx

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
	$(PY) -m benchmarks.http_filter

agent-image:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "agent-image needs a running Docker engine"; exit 1; }
	docker build -f agent_image/Dockerfile -t $${NETMIRROR_AGENT_IMAGE:-ghcr.io/netmirror/agent:0.1.0} .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache benchmarks/results
