#!/usr/bin/env bash
# check.py against the real TensorRT Python bindings of both majors, without a GPU: 10.3 (the oldest ovseg takes,
# JetPack 6's), 10.16 (the newest 10, the major ONNX Runtime's TensorRT provider links) and 11.4, each in a venv of
# its own over stub.c's libraries. The bindings' -libs wheels are not used: they are placeholders that download the
# real libraries from NVIDIA at install time. Arguments: the files to check (default: all of ovseg's).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${TRT_API_DIR:-build/trt-api}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
failed=0
for spec in 10:tensorrt-cu12-bindings==10.3.0 10:tensorrt-cu13-bindings==10.16.1.11 \
  11:tensorrt-cu13-bindings==11.4.0.106; do
  major=${spec%%:*}
  venv=$OUT/${spec##*==}
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "${spec#*:}"
  mkdir -p "$venv/stubs"
  for lib in nvinfer nvonnxparser nvinfer_plugin; do
    gcc -shared -fPIC -Wl,-soname,lib$lib.so.$major -o "$venv/stubs/lib$lib.so.$major" tests/trt_api/stub.c
  done
  # The `tensorrt` module of the tensorrt metapackage is this re-export of the bindings.
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  mkdir -p "$site/tensorrt"
  printf 'from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n' >"$site/tensorrt/__init__.py"
  LD_LIBRARY_PATH="$venv/stubs" "$venv/bin/python" tests/trt_api/check.py "$@" || failed=1
done
exit $failed
