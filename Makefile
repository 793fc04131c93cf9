# Every target makes the virtualenv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deps venv run test lint bench bench-failover chaos clean

# System packages (scripts/deps.sh: a table of command -> Debian package; apt-get as root,
# otherwise one line naming what is missing). Only what the goals given need: `make run`
# installs no browser; `make deps` alone installs everything.
DEPS_FOR := $(or $(sort $(patsubst chaos,test,$(filter run test chaos,$(MAKECMDGOALS)))),run test)
deps:
	@scripts/deps.sh $(DEPS_FOR)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@scripts/deps.sh venv
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: deps venv
	$(BIN)/ingester dev

# tests/interop: tus-js-client, Uppy and playwright-core, pinned in package-lock.json.
NODE_PROJECT := tests/interop/node
NODE_STAMP := $(NODE_PROJECT)/node_modules/.installed

# Node.js comes first from the venv (where scripts/deps.sh puts one from PyPI when the
# system's is too old), then from PATH; the tests look in the same order.
WITH_VENV_PATH := PATH="$(abspath $(BIN)):$$PATH"

$(NODE_STAMP): $(NODE_PROJECT)/package.json $(NODE_PROJECT)/package-lock.json $(STAMP)
	@scripts/deps.sh node
	cd $(NODE_PROJECT) && $(WITH_VENV_PATH) npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Most tests wait on real processes (elements, Redis, the ingester), so more workers than
# cores keep the machine busy. Work stealing, not xdist's default chunks: the long tests
# (soaks, 1 GiB round trips) then never queue behind one another at the end. On the 2-core
# machine: 3:51 with 4 workers, 6:21 with 3 in chunks, 12 min in order.
# TEST_WORKERS=0 runs the tests in this process, in order.
TEST_WORKERS ?= 4
test: deps venv $(NODE_STAMP)
	$(WITH_VENV_PATH) $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check ingester tests bench
	$(BIN)/ruff format --check ingester tests bench
	$(BIN)/mypy

# Section 6 (tus) runs tus-js-client under Node: the npm project, Node from the venv first.
bench: venv $(NODE_STAMP)
	$(WITH_VENV_PATH) $(BIN)/python -m bench.run_all

# What an element's death costs an upload: failover time p50/p99, extra time (bench/failover.py).
bench-failover: venv
	$(BIN)/python -m bench.failover

# The long soak: SOAK_UPLOADS uploads with random element kills (tests/chaos/test_soak.py);
# the summary line is printed at the end.
SOAK_UPLOADS ?= 300
chaos: deps venv
	INGESTER_SOAK_UPLOADS=$(SOAK_UPLOADS) $(BIN)/pytest tests/chaos -m soak $(PYTEST_ARGS)

# The container images without a Docker engine or a registry: podman builds the Dockerfile
# on a Debian bookworm base made here with debootstrap (cached by its recipe), plus the
# try-it stack's Redis image; missing tools are installed first (deploy/image/, README).
IMAGE ?= artstore-ingester:$(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
REDIS_IMAGE ?= artstore-redis:bookworm
.PHONY: image
image:
	IMAGE=$(IMAGE) REDIS_IMAGE=$(REDIS_IMAGE) deploy/image/build.sh

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache .hypothesis .artifacts $(NODE_PROJECT)/node_modules
