#!/usr/bin/env bash
# make test-arm64: the lean runtime (no torch) built and tested on arm64 in an emulated Debian root (qemu-user).
# The host's .venv exports the bundles and segments photos for reference; the arm64 root must give the same
# label maps and pass the torch-free tests. Needs root (apt, binfmt_misc, chroot, mounts). Cold: ~20 min.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${OVSEG_HOME:-$HOME/.cache/ovseg}/arm64
ROOT=$CACHE/root
HOST_PY=$REPO/.venv/bin/python
VENV=/opt/ovseg-venv                  # paths inside the root
BUILD=/opt/ovseg-build                # CMake build dir kept between runs: only changed sources recompile
DATA=/ovseg/data
SRC=/ovseg/src
ROOT_PACKAGES=ca-certificates,python3,python3-venv,python3-dev,g++,cmake,make
BUILD_TOOLS=(scikit-build-core nanobind pybind11 setuptools wheel numpy)
LEAN=(numpy onnxruntime hnswlib opencv-python-headless tokenizers tqdm pytest hypothesis)  # hypothesis: test_native
# Torch-free test modules. Left out: test_segment_quality (448 px real DINOv2: hours under qemu), test_export,
# test_dinov2_export, test_train*, test_calib* (torch/onnx: export side), test_eval_* and test_bench (eval/bench
# extras: pillow, imgviz, torch for the naive reference).
TESTS=(tests/test_native.py tests/test_lookup.py tests/test_segmenter.py tests/test_segmenter_errors.py
       tests/test_runtime_imports.py tests/test_run_cli.py tests/test_sinks.py tests/test_sources.py
       tests/test_vocabulary.py tests/test_eval_metrics.py)
DESELECT=(  # the sample clip needs scikit-image (a dev extra); the last one open_clip (export side)
  tests/test_sources.py::test_sample_clip_pans_across_real_photos
  tests/test_run_cli.py::test_sample_clip_source
  tests/test_run_cli.py::test_a_real_run_never_imports_torch
  "tests/test_run_cli.py::test_bad_inputs_are_one_line_errors_with_exit_2[argv4-cannot write video /dev/null/out.mp4]"
  tests/test_run_cli.py::test_unreachable_weights_are_their_own_export_error)

die() { echo "test-arm64: $*" >&2; exit 1; }
# ONNX Runtime warns on every import that cpuinfo cannot read /sys, which is left out on purpose (below).
no_cpuinfo_noise() { grep -vE 'cpuinfo|cpuid_info' || true; }

TIMES=() PHASE=setup PHASE_START=$SECONDS MOUNTED=0
phase() {  # phase NAME: close the running phase (its time goes into the summary), open NAME
  local s=$((SECONDS - PHASE_START))
  [[ $PHASE == setup ]] || TIMES+=("$(printf '  %-34s %3dm%02ds' "$PHASE" $((s / 60)) $((s % 60)))")
  PHASE=$1 PHASE_START=$SECONDS
  echo "== $PHASE"
}
finish() {
  local rc=$? failed=$PHASE
  if ((MOUNTED)); then umount -R "$ROOT/dev" || true; umount "$ROOT/proc" || true; fi
  phase done
  echo "phase times:"; printf '%s\n' "${TIMES[@]}"
  if ((rc == 0)); then
    echo "test-arm64: PASSED in $((SECONDS / 60))m$((SECONDS % 60))s: arm64 build, segmentation as on x86, torch-free tests"
  else
    echo "test-arm64: FAILED in phase '$failed' (exit $rc) after $((SECONDS / 60))m$((SECONDS % 60))s" >&2
  fi
}
trap finish EXIT

in_root() {  # a clean environment: none of the host's pip settings (its find-links and indexes are host paths)
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=180 "$@"
}

phase "host tools, binfmt_misc"
[[ $(id -u) == 0 ]] || die "needs root (apt-get, binfmt_misc, chroot, mounts): run it as root, e.g. sudo make test-arm64"
[[ -x $HOST_PY ]] || die "no $HOST_PY: run make setup first (the host exports the bundles with torch)"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v arch-test >/dev/null || missing+=(arch-test)  # mmdebstrap checks foreign architectures with it
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if ((${#missing[@]})); then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    || die "could not install ${missing[*]}: install them with apt-get (Debian/Ubuntu) and run again"
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
  || die "cannot mount binfmt_misc (a container without the privilege?): mount it on the host and run again"
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then  # no binfmt-support database: register it ourselves
  # F: the interpreter is opened now, so it need not exist inside the root.
  echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
    > /proc/sys/fs/binfmt_misc/register || true
fi
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || die "qemu-aarch64 is not registered with binfmt_misc: run update-binfmts --enable qemu-aarch64"

phase "arm64 Debian root"
if [[ $(cat "$ROOT/.ovseg-root" 2>/dev/null) != "$ROOT_PACKAGES" ]]; then
  # Built beside its final place and renamed, so an interrupted build is never taken for a cached one.
  for dir in "$ROOT.tmp" "$ROOT"; do
    ! grep -q " $dir/" /proc/mounts || die "$dir still has mounts (an interrupted run?): umount -R them first"
    rm -rf "$dir"
  done
  # The host's Debian mirror (deb822 sources, then sources.list), else deb.debian.org.
  mirror=$(sed -n 's|^URIs: *\(.*/debian\)/\?$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  [[ -n $mirror ]] || mirror=$(sed -n 's|^deb \+\(http[^ ]*/debian\)/\? .*|\1|p' /etc/apt/sources.list 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  security=$(sed -n 's|^URIs: *\(.*/debian-security\)/\?$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  security=${security:-${mirror%/debian}/debian-security}
  echo "mirror $mirror, $security"
  mkdir -p "$CACHE"
  mmdebstrap --architectures=arm64 --variant=apt --include="$ROOT_PACKAGES" bookworm "$ROOT.tmp" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main"
  echo "$ROOT_PACKAGES" > "$ROOT.tmp/.ovseg-root"
  mv "$ROOT.tmp" "$ROOT"
else
  echo "cached: $ROOT"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's own CA certificates too: pip in the root must trust what the host trusts (e.g. a TLS proxy).
new_ca=0
for crt in /usr/local/share/ca-certificates/*.crt; do
  [[ ! -f $crt ]] || cmp -s "$crt" "$ROOT$crt" || { cp "$crt" "$ROOT$crt"; new_ca=1; }
done
((new_ca == 0)) || chroot "$ROOT" update-ca-certificates >/dev/null 2>&1  # ~1 min under qemu: only when new
# /proc and /dev only: with /sys, ONNX Runtime's CPU probe reads the host's x86 topology and crashes under qemu.
mount -t proc proc "$ROOT/proc"
MOUNTED=1
mount --rbind /dev "$ROOT/dev"
mount --make-rslave "$ROOT/dev"  # unmounting the copy must never reach the host's /dev
[[ $(in_root uname -m) == aarch64 ]] || die "the root does not run as aarch64"

phase "arm64 venv (lean runtime)"
mkdir -p "$ROOT/ovseg"
cp "$REPO/.ci/constraints.txt" "$ROOT/ovseg/constraints.txt"
stamp="$(sha256sum < "$REPO/.ci/constraints.txt" | cut -c1-16) ${BUILD_TOOLS[*]} ${LEAN[*]}"
if [[ $(cat "$ROOT$VENV/.ovseg-venv" 2>/dev/null) != "$stamp" ]]; then
  # A venv cannot be moved, so it is built in place; the stamp, written last, marks it complete.
  rm -rf "$ROOT$VENV" "$ROOT$BUILD"
  in_root python3 -m venv "$VENV"
  in_root pip install -q -c /ovseg/constraints.txt "${BUILD_TOOLS[@]}"
  # hnswlib is an sdist only: compiled here (~5 min); without -march=native, which would read qemu's CPU.
  in_root env HNSWLIB_NO_NATIVE=1 pip install -q --no-build-isolation -c /ovseg/constraints.txt "${LEAN[@]}"
  echo "$stamp" > "$ROOT$VENV/.ovseg-venv"
else
  echo "cached: $VENV"
fi
in_root pip list 2>/dev/null | grep -iE '^(numpy|onnxruntime|hnswlib|opencv-python-headless|tokenizers) '

phase "arm64 build of ovseg + ovseg._native"
# The working tree as git sees it (tracked and untracked files, not ignored ones), the same code the host's
# editable .venv runs, so uncommitted changes (runtime/native/ included) are tested too. tar keeps the
# modification times: the kept build dir recompiles only sources that changed.
rm -rf "$ROOT$SRC"
mkdir -p "$ROOT$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
  | tar -xf - -C "$ROOT$SRC"
in_root pip install -v --no-deps --no-build-isolation --force-reinstall \
  --config-settings=build-dir="$BUILD/{wheel_tag}" "$SRC" > "$CACHE/build.log" 2>&1 \
  || { tail -40 "$CACHE/build.log"; die "the arm64 build failed: $CACHE/build.log"; }
grep -E ': (warning|error):' "$CACHE/build.log" || echo "no compiler warnings in this build ($CACHE/build.log)"
in_root python -c 'import platform; from ovseg import _native; print("ovseg._native imports on", platform.machine())'
in_root python -c 'import onnxruntime; print("onnxruntime", onnxruntime.get_available_providers())' 2>&1 | no_cpuinfo_noise

phase "x86 reference (host .venv)"
rm -rf "$ROOT$DATA"
TQDM_DISABLE=1 "$HOST_PY" "$REPO/tests/arm64/host_prepare.py" "$ROOT$DATA"
"$HOST_PY" "$REPO/tests/arm64/segment.py" "$ROOT$DATA/photo_bundle" "$ROOT$DATA/photos" "$ROOT$DATA/x86"

phase "arm64 segmentation vs x86"
in_root python "$SRC/tests/arm64/segment.py" "$DATA/photo_bundle" "$DATA/photos" "$DATA/arm64" --compare "$DATA/x86" \
  2>&1 | no_cpuinfo_noise

phase "arm64 torch-free tests"
# host_bundle.py hands conftest's tiny_bundle fixture the bundle the host exported (exporting needs torch).
# Run from tests/: in the source root, ovseg/ would shadow the installed package (in pytest's subprocesses too).
in_root env -C "$SRC/tests" OVSEG_ARM64_DATA=$DATA PYTHONPATH=$SRC/tests/arm64 \
  pytest -q -p host_bundle -p no:cacheprovider "${TESTS[@]/#/$SRC/}" "${DESELECT[@]/#/--deselect=}" 2>&1 | no_cpuinfo_noise
