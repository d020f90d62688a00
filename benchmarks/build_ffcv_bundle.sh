#!/usr/bin/env bash
# Build a self-contained FFCV bundle under .devpkg/ for a GPU machine that has
# Python 3.12 + torch/numpy/numba/opencv-python-headless but no network, no ffcv
# and no libturbojpeg/libopencv system libraries.
#
#   .devpkg/wheels/   ffcv 1.0.2 (cp312, built from source here) + the pure-python
#                     runtime deps the target lacks (fastargs, terminaltables,
#                     pytorch_pfn_extras, assertpy). numpy/numba/llvmlite/torch/
#                     opencv-python are NOT bundled: the target has them.
#   .devpkg/lib/      shared libraries ffcv/_libffcv*.so needs (libturbojpeg,
#                     libopencv_core/imgproc and their non-glibc deps), under
#                     their SONAMEs.
#   .devpkg/activate.sh  source it on the target from the repo root.
#
# Build host requirements: Linux x86-64, a CPython 3.12 interpreter, network
# access to PyPI, and the dev packages
#   apt-get install -y libturbojpeg0-dev libopencv-dev pkg-config
# (installed automatically when missing and we are root with apt-get).
#
# Usage (from anywhere; paths are relative to the repo root):
#   PYTHON312=~/.pyenv/versions/3.12.1/bin/python3.12 benchmarks/build_ffcv_bundle.sh
# Idempotent: the bundle is rebuilt from scratch on every run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."          # repo root
PY=${PYTHON312:-python3.12}
FFCV_VERSION=1.0.2
PFN_VERSION=0.9.0                                # pure python, works with torch 2.x / numpy 2.x
BUNDLE=.devpkg
BUILD=$(mktemp -d /tmp/ffcv-bundle-build.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT

# Keep the bundle out of git without touching .gitignore.
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.devpkg/' "$EXCLUDE" 2>/dev/null || echo '/.devpkg/' >>"$EXCLUDE"

# --- build prerequisites ------------------------------------------------------
if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config
    else
        echo "need: libturbojpeg0-dev libopencv-dev pkg-config" >&2; exit 1
    fi
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "PYTHON312 must point to a CPython 3.12 interpreter" >&2; exit 1; }

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/lib"

# --- 1. wheels ----------------------------------------------------------------
"$PY" -m venv "$BUILD/venv"
VPY=$BUILD/venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
# ffcv's setup.py takes all of `pkg-config --libs opencv4` (~50 libs);
# --as-needed keeps only the ones really referenced (core, imgproc).
LDFLAGS="-Wl,--as-needed" "$VPY" -m pip wheel -q --no-deps --no-build-isolation \
    --no-binary ffcv --no-cache-dir -w "$BUNDLE/wheels" "ffcv==$FFCV_VERSION"
# Runtime deps of ffcv missing on the target (fastargs/assertpy are sdists on
# PyPI, so `pip wheel` turns them into py3-none-any wheels).
"$VPY" -m pip wheel -q --no-deps -w "$BUNDLE/wheels" \
    fastargs terminaltables assertpy "pytorch_pfn_extras==$PFN_VERSION"
for w in "$BUNDLE"/wheels/*.whl; do
    case $w in *ffcv-*|*-none-any.whl) ;; *) echo "unexpected binary wheel: $w" >&2; exit 1;; esac
done

# --- 2. shared libraries ------------------------------------------------------
EXT_DIR=$BUILD/ffcv-ext
"$VPY" -m zipfile -e "$BUNDLE"/wheels/ffcv-*.whl "$EXT_DIR"
EXT=$(ls "$EXT_DIR"/ffcv/_libffcv*.so)
echo "extension NEEDED: $(objdump -p "$EXT" | awk '/NEEDED/{printf "%s ", $2}')"
# ldd lists the transitive closure. Skip glibc, the C++/gcc runtimes (the target
# has newer ones) and libz (always present on Ubuntu; shadowing it is riskier).
SKIP='^(linux-vdso|ld-linux|libc|libm|libpthread|libdl|librt|libutil|libresolv|libstdc\+\+|libgcc_s|libz)\.so'
ldd "$EXT" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    [[ $soname =~ $SKIP ]] && continue
    cp -L "$path" "$BUNDLE/lib/$soname"
done
if ldd "$EXT" | grep -q 'not found'; then ldd "$EXT" >&2; exit 1; fi

# --- 3. activate script for the target ---------------------------------------
cat >"$BUNDLE/activate.sh" <<'EOF'
# Source from the repo root on the target:  source .devpkg/activate.sh
# Installs the bundled wheels into /tmp/site (no network, no deps) and puts
# them and the bundled shared libraries on the search paths.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .devpkg/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$PWD/.devpkg/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# ffcv/pipeline/graph.py does `from distutils.log import warn`; Python 3.12 has
# no distutils (setuptools normally provides it). Add a tiny shim if needed.
if ! python3 -c 'import distutils.log' 2>/dev/null; then
    mkdir -p /tmp/site/distutils
    : >/tmp/site/distutils/__init__.py
    printf '%s\n' 'import sys' \
        'def warn(msg, *args):' \
        '    print("warning:", msg % args if args else msg, file=sys.stderr)' \
        >/tmp/site/distutils/log.py
fi
EOF

# --- summary ------------------------------------------------------------------
ls -l "$BUNDLE/wheels" "$BUNDLE/lib"
echo "bundle size: $(du -sh "$BUNDLE" | cut -f1) ($(du -sb "$BUNDLE" | cut -f1) bytes)"
