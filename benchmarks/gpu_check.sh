#!/usr/bin/env bash
# gpu_check: everything this project can check on a machine with a CUDA GPU, in one call, into one results folder.
#
#   bash benchmarks/gpu_check.sh          (or `make gpu-check`) from a fresh clone; under 8 minutes
#
# Results: $OUT when set (the device tool sets it), else gpu_check_results/. They hold summary.txt (one line per
# step), gpu_check.log (everything printed), build.log, pytest-gpu.xml (junit), and, where the later steps run,
# check.json, bench_cuda.json and bench_tensorrt.json. Scratch (venv, CMake build, bundle) goes to $GPU_CHECK_WORK or
# a new folder under /tmp.
#
# Nothing is downloaded: wheels carried in .whl/ are installed (the device README's recipe), hnswlib is built from a
# carried sdist (.whl/hnswlib-*.tar.gz) if there is one. The lent GPU machine has torch with CUDA but no open_clip:
# carry open_clip_torch, ftfy and wcwidth (pure-Python wheels) and hnswlib's sdist for the torch steps. ovseg's GPU
# inference runs in ONNX Runtime's CUDA and TensorRT providers and in TensorRT plans, its training and export in torch,
# so what a machine can check depends on what it has:
#   1 env         nvidia-smi, Python and package versions, python -m ovseg.environment
#   2 build       the native module, editable into a venv that sees $PYTHON's packages; a failure stops here
#   3 tests       pytest -m gpu: the TensorRT runner's test (needs tensorrt and a GPU)
#     export-cuda, train-amp, pretrain-cuda   the torch side, tests/test_torch_gpu.py (needs torch with CUDA and
#                   open_clip; train-amp also hnswlib): the export's modules traced on CUDA vs the CPU and ONNX
#                   Runtime; ovseg-train under torchrun, mixed precision vs --fp32, and NCCL; the tiny CLIP's
#                   pretraining, a step vs the CPU's and 30 more
#   4 bundle      the tests' tiny bundle (needs torch, open_clip, hnswlib), when a later step can use it
#     ovseg-build   TensorRT fp16 plans (needs tensorrt)
#     ovseg-build-int8   ovseg-calib --tensorrt's symmetric int8 model, then TensorRT int8 plans from it (needs tensorrt)
#     ovseg-check   every backend x precision vs CPU fp32 (GPU rows need onnxruntime-gpu or tensorrt)
#     bench-cuda, bench-tensorrt   ovseg-bench --quick on each GPU backend (needs onnxruntime-gpu)
#     serving       python -m ovseg.benchmarks.serving: streams through ovseg-serve, batch sizes Triton formed
#                   (needs onnxruntime-gpu, nvidia-pytriton, tritonclient and numpy < 2)
# Each step prints `gpu_check: <step>: PASS|FAIL|SKIP (<reason>)`; the exit status is 1 if a step that ran failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
RESULTS=${OUT:-$REPO/gpu_check_results}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
SUMMARY=$RESULTS/summary.txt
rm -f "$RESULTS"/{summary.txt,gpu_check.log,build.log,pytest-gpu.xml} \
  "$RESULTS"/{check.json,bench_cuda.json,bench_tensorrt.json} && rm -rf "$RESULTS/serving"  # a previous run's
# Python: $PYTHON, else the one that holds torch on the lent machine (plain python3), else a `make setup` venv.
if [[ -z ${PYTHON:-} ]]; then
  if python3 -c 'import nanobind, scikit_build_core' 2>/dev/null; then PYTHON=python3
  elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
  else PYTHON=python3
  fi
fi
export PYTHONUNBUFFERED=1
FAILED=0

# One summary line per step, with the step's time.
step_start() { STEP_T0=$SECONDS; echo; echo "==== gpu_check: $1"; }
record() {  # record STEP PASS|FAIL|SKIP REASON
  echo "gpu_check: $1: $2 ($3; $((SECONDS - STEP_T0)) s)" | tee -a "$SUMMARY"
  if [[ $2 == FAIL ]]; then FAILED=$((FAILED + 1)); fi
}
finish() {
  local verdict=PASS
  if ((FAILED > 0)); then verdict="FAIL ($FAILED steps failed)"; fi
  echo "gpu_check: result: $verdict in $SECONDS s; results in $RESULTS" | tee -a "$SUMMARY"
  echo
  cat "$SUMMARY"
  ((FAILED == 0))
}
# The symmetric int8 model ovseg-build --int8 builds from: ovseg-calib --tensorrt on six synthetic frames. --force:
# this step is about the plans (ovseg-build gates them); the CPU int8 gate's verdict stays in the manifest.
int8_source() {
  "$VPY" - "$WORK/frames" <<'EOF' || return 1
import sys
from pathlib import Path

import cv2

from ovseg.runtime.tools.check import synthetic_frames

out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
for i, frame in enumerate(synthetic_frames(6)):
    cv2.imwrite(str(out / f"{i}.png"), frame)
EOF
  timeout 300 "$WORK/venv/bin/ovseg-calib" --bundle "$1" --calib-images "$WORK/frames" --frames 6 --timing-runs 1 \
    --tensorrt --force 2>&1
}
importable() { "$VPY" -c "import $1" >/dev/null 2>&1; }
# torch_step STEP TEST MODULE...: tests/test_torch_gpu.py::TEST, where torch has CUDA and each MODULE imports.
torch_step() {
  local step=$1 test=$2 module rc=0
  shift 2
  step_start "$step"
  if [[ -n $no_torch_cuda ]]; then record "$step" SKIP "$no_torch_cuda"; return; fi
  for module in "$@"; do
    if ! importable "$module"; then record "$step" SKIP "$module does not import (carry it in .whl/)"; return; fi
  done
  timeout 240 "$VPY" -m pytest -m gpu -q -rs -p no:cacheprovider "tests/test_torch_gpu.py::$test" 2>&1 \
    | tee "$WORK/$step.log" || rc=$?
  if ((rc != 0)); then record "$step" FAIL "pytest exit $rc"
  elif grep -q ' skipped' "$WORK/$step.log"; then record "$step" SKIP "$(grep -m1 '^SKIPPED' "$WORK/$step.log")"
  else record "$step" PASS "$test"
  fi
}

main() {
  {
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
      "($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files)"
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | paste -sd';' || true)"
    echo "results: $RESULTS; scratch: $WORK; python: $PYTHON"
  } >"$SUMMARY"
  cat "$SUMMARY"

  # ---- 1. environment report ----
  step_start env
  echo "-- nvidia-smi -L"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1 || true; else echo "(nvidia-smi not found)"; fi
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  echo "-- uname: $(uname -srm); CPUs: $(nproc)"
  echo "-- $PYTHON: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PYTHON" - <<'EOF'
import importlib
for name in ("numpy", "cv2", "onnxruntime", "torch", "cupy", "nanobind", "scikit_build_core", "tensorrt", "hnswlib",
             "open_clip", "tokenizers", "pytest", "hypothesis"):
    try:
        mod = importlib.import_module(name)
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        continue
    extra = ""
    if name == "onnxruntime":
        extra = f" providers {mod.get_available_providers()}"
    elif name == "torch":
        extra = f" cuda {mod.version.cuda}, device: {mod.cuda.get_device_name(0) if mod.cuda.is_available() else 'none'}"
    print(f"{name}: {getattr(mod, '__version__', '?')}{extra}")
EOF
  echo "-- python -m ovseg.environment"
  local env_rc=0
  "$PYTHON" -m ovseg.environment 2>&1 || env_rc=$?
  record env PASS "report in gpu_check.log; ovseg.environment exit $env_rc"

  # ---- 2. build into a venv that sees $PYTHON's packages ----
  step_start build
  "$PYTHON" -m venv --without-pip --system-site-packages "$WORK/venv"
  VPY=$WORK/venv/bin/python
  # $PYTHON may itself be a venv (the lent machine's /opt/torch/.venv): name its site folders, without running
  # their .pth files (a `make setup` venv's editable ovseg would shadow this build).
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_gpu_check_base.pth"
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    echo "-- carried wheels: $(cd "$REPO/.whl" && ls ./*.whl | tr '\n' ' ')"
    "$VPY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$REPO"/.whl/*.whl
  fi
  local hnsw_note="hnswlib: $(importable hnswlib && echo installed || echo absent)"
  if ! importable hnswlib && compgen -G "$REPO/.whl/hnswlib-*.tar.gz" >/dev/null; then
    if "$VPY" -m pip install -q --no-index --no-deps --no-build-isolation "$REPO"/.whl/hnswlib-*.tar.gz; then
      hnsw_note="hnswlib: built from the carried sdist"
    else
      hnsw_note="hnswlib: the carried sdist failed to build"
    fi
  fi
  echo "-- $hnsw_note"
  if "$VPY" -m pip install -v --no-index --no-deps --no-build-isolation -C build-dir="$WORK/build" -e "$REPO" \
    >"$RESULTS/build.log" 2>&1 && [[ $("$VPY" -c 'import ovseg._native as n; print(n.__file__)' 2>&1) == "$WORK"/* ]]; then
    record build PASS "$hnsw_note; build.log"
  else
    tail -n 30 "$RESULTS/build.log"
    record build FAIL "the native module did not build: see build.log"
    echo "gpu_check: stopping: every later step needs the build"
    finish
    return
  fi

  local no_device=""
  nvidia-smi -L 2>/dev/null | grep -q '^GPU' || no_device="no CUDA device (nvidia-smi lists no GPU)"

  # ---- 3. GPU-marked tests ----
  step_start tests
  if [[ -n $no_device ]]; then record tests SKIP "$no_device"
  elif ! importable tensorrt || ! importable ovseg.runtime; then
    record tests SKIP "the GPU-marked test runs a TensorRT plan: tensorrt or ovseg.runtime does not import"
  else
    local junit=$RESULTS/pytest-gpu.xml rc=0
    timeout 300 "$VPY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$junit" tests/test_segmenter_errors.py \
      2>&1 || rc=$?
    if ((rc != 0)); then record tests FAIL "pytest exit $rc; pytest-gpu.xml"; else record tests PASS "pytest-gpu.xml"; fi
  fi

  # ---- 3b. the torch side on the GPU ----
  local no_torch_cuda  # why the torch steps cannot run; empty where torch has a GPU
  no_torch_cuda=$("$VPY" -c 'import torch as t; t.cuda.is_available() or print(f"torch {t.__version__} sees no GPU")' \
    2>/dev/null || echo "torch does not import")
  torch_step export-cuda test_export_traced_on_cuda_matches_the_cpu_and_onnxruntime open_clip
  torch_step train-amp test_ovseg_train_with_mixed_precision_under_torchrun open_clip hnswlib
  torch_step pretrain-cuda test_pretraining_steps_on_cuda open_clip

  # ---- 4. later modes: only where onnxruntime-gpu or tensorrt is installed ----
  local ort_gpu="" trt="" bundle=$WORK/bundle
  if "$VPY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
    2>/dev/null; then ort_gpu=1; fi
  importable tensorrt && trt=1
  local why_no_ort="onnxruntime $("$VPY" -c 'import onnxruntime as o; print(o.__version__)' 2>/dev/null || echo '(none)')"
  why_no_ort+=" has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
  step_start bundle
  local have_bundle=""
  if [[ -n $no_device ]]; then record bundle SKIP "$no_device"
  elif [[ -z $ort_gpu && -z $trt ]]; then record bundle SKIP "nothing below can use it: $why_no_ort, tensorrt not importable"
  elif ! importable ovseg.runtime; then record bundle SKIP "ovseg.runtime does not import (hnswlib? carry its sdist in .whl/)"
  elif ! importable torch || ! importable open_clip; then
    record bundle SKIP "exporting needs torch and open_clip (carry open_clip_torch and its needs as wheels in .whl/)"
  elif timeout 300 "$VPY" - "$bundle" <<'EOF'; then
import sys
from pathlib import Path

from ovseg.export import dinov2
from ovseg.export.bundle import ExportConfig, export_bundle
from ovseg.export.clip import tiny_clip

config = ExportConfig(out=Path(sys.argv[1]), force=True, image_size=112, vocab="voc21", fp16=True)
export_bundle(config, clip_model=tiny_clip(), dinov2_model=dinov2.random_dinov2(dinov2.tiny_dinov2_config()))
EOF
    have_bundle=1; record bundle PASS "tiny bundle (112, voc21, fp16) in $bundle"
  else record bundle FAIL "the tiny bundle's export failed"
  fi
  local no_bundle="no bundle (see the bundle step)"

  step_start ovseg-build
  if [[ -z $trt ]]; then record ovseg-build SKIP "tensorrt not importable"
  elif [[ -z $have_bundle ]]; then record ovseg-build SKIP "$no_bundle"
  elif timeout 400 "$WORK/venv/bin/ovseg-build" --bundle "$bundle" --fp16 --frames 4 2>&1; then
    record ovseg-build PASS "fp16 plans built and checked against fp32"
  else record ovseg-build FAIL "exit $?"
  fi

  step_start ovseg-build-int8
  if [[ -z $trt ]]; then record ovseg-build-int8 SKIP "tensorrt not importable"
  elif [[ -z $have_bundle ]]; then record ovseg-build-int8 SKIP "$no_bundle"
  elif ! int8_source "$bundle"; then record ovseg-build-int8 FAIL "ovseg-calib --tensorrt did not write the symmetric int8 model"
  elif timeout 400 "$WORK/venv/bin/ovseg-build" --bundle "$bundle" --int8 --frames 4 2>&1; then
    record ovseg-build-int8 PASS "int8 plans from the symmetric Q/DQ model, checked against fp32"
  else record ovseg-build-int8 FAIL "exit $?"
  fi

  step_start ovseg-check
  if [[ -z $ort_gpu && -z $trt ]]; then record ovseg-check SKIP "no GPU rows can run: $why_no_ort, tensorrt not importable"
  elif [[ -z $have_bundle ]]; then record ovseg-check SKIP "$no_bundle"
  elif timeout 300 "$WORK/venv/bin/ovseg-check" --bundle "$bundle" --frames 4 --json "$RESULTS/check.json" 2>&1; then
    record ovseg-check PASS "every combination that ran passed; check.json"
  else record ovseg-check FAIL "exit $?; check.json"
  fi

  local backend
  for backend in cuda tensorrt; do
    step_start "bench-$backend"
    if [[ -z $ort_gpu ]]; then record "bench-$backend" SKIP "$why_no_ort"
    elif [[ -z $have_bundle ]]; then record "bench-$backend" SKIP "$no_bundle"
    elif timeout 300 "$WORK/venv/bin/ovseg-bench" --bundle "$bundle" --quick --backend "$backend" --precision fp16 \
      --out "$RESULTS/bench_$backend.json" 2>&1; then
      record "bench-$backend" PASS "ovseg-bench --quick; bench_$backend.json"
    else record "bench-$backend" FAIL "exit $?"
    fi
  done

  step_start serving
  if [[ -z $ort_gpu ]]; then record serving SKIP "$why_no_ort"
  elif [[ -z $have_bundle ]]; then record serving SKIP "$no_bundle"
  elif ! importable pytriton || ! importable tritonclient.grpc; then
    record serving SKIP "ovseg-serve needs nvidia-pytriton and tritonclient (carry them as wheels in .whl/; numpy < 2)"
  elif timeout 400 "$VPY" -m ovseg.benchmarks.serving --bundle "$bundle" --serve-python "$VPY" --frames 20 \
    --out "$RESULTS/serving" 2>&1; then
    record serving PASS "1, 2, 4, 8 streams through ovseg-serve vs in-process; serving/serving.json"
  else record serving FAIL "exit $?"
  fi

  finish
}

main 2>&1 | tee "$RESULTS/gpu_check.log"
exit "${PIPESTATUS[0]}"
