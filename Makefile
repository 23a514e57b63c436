# Two commands do everything on a fresh machine (see README.md):
#   make demo   - the operator's main job on an embedded default, then tear down
#   make test   - lint, types, unit + integration tests, then the e2e suite on a real control plane
#   make image  - the container image as an OCI archive (build/), with its SBOM
# Everything they need is installed by `make bootstrap` (a venv in .venv, the Kubernetes tools built
# from Go modules into ~/.cache/smtp-oauth-operator, reused when present).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: bootstrap tools debs lint unit e2e test demo bench bench-relay clean image

bootstrap: $(STAMP) tools debs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

tools:
	bash hack/k8s-tools.sh >/dev/null
	bash hack/sealed-secrets.sh >/dev/null
	bash hack/image-debs.sh
	bash hack/alertmanager.sh >/dev/null

# Real SMTP clients for the relay tests (swaks, msmtp) from Debian's packages.
debs:
	bash hack/debian-packages.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	bash hack/lint-dockerfile.sh
	bash hack/sync-chart-crds.sh --check
	bash hack/lint-workflows.sh

unit: $(STAMP)
	$(BIN)/python -m pytest tests --cov --cov-branch --cov-report=term --cov-fail-under=75

e2e: bootstrap
	$(BIN)/python -m pytest e2e -p no:cacheprovider

test: bootstrap lint unit e2e

demo: bootstrap
	$(BIN)/python -m e2e.demo

bench: bootstrap
	$(BIN)/python -m e2e.bench

# The container image as an OCI archive and its SBOM in build/ (no daemon, no registry; see docs/install.md).
image:
	bash hack/image-debs.sh
	bash hack/image.sh

# The relay against the floor and email-oauth2-proxy (docs/performance.md, "SMTP relay").
bench-relay: bootstrap
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m e2e.bench relay

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
