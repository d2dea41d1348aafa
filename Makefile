# The README's commands. `make run` and `make test` create .venv through `setup` when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test test-fast bench lint clean wheelhouse images

setup: $(VENV)/.installed

# pip (not uv/poetry): only pip picks torch 2.14.1 / torchvision 0.29.1 from the machines' local disk.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "installing .[train,serve,dev] into $(VENV) (log: $(VENV)/setup.log)"
	@$(BIN)/python -m pip install --quiet --upgrade "pip==26.3" > $(VENV)/setup.log 2>&1 \
	  && $(BIN)/python -m pip install --quiet -e ".[train,serve,dev]" >> $(VENV)/setup.log 2>&1 \
	  || { tail -n 40 $(VENV)/setup.log; exit 1; }
	touch $@

run: setup
	dvc repro

test: setup
	pytest

test-fast: setup
	pytest -m "not slow"

lint: setup
	ruff check pipeline flows tests bench

# Container images, built offline (docker/README.md). IMAGES="serve train" adds the training image (~10 GB of disk).
IMAGES ?= serve
# The only step that reaches the package registries: pip wheels of each image's pinned extras, and the project wheel.
wheelhouse:
	$(PYTHON) docker/images.py wheelhouse $(IMAGES)

# Docker when an engine answers, else buildah (daemonless, no network during the build) on a debootstrap base.
images:
	$(PYTHON) docker/images.py build $(IMAGES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
