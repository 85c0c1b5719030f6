#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install everything into it.
#
#   bash scripts/setup_env.sh            # .venv with the CPU build of torch (the default)
#   VENV=/path/env bash scripts/setup_env.sh
#   TORCH_SPEC="torch==2.13.0" ...       # which torch to install first (see docs/INSTALL.md for GPUs)
#   PILLOW_SIMD=0 ...                    # keep stock Pillow, skip the pillow-simd build
#
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

stamp_of() { cat pyproject.toml scripts/setup_env.sh scripts/install_pillow_simd.sh | sha256sum | cut -c1-16; echo "$TORCH_SPEC ${PILLOW_SIMD:-1}"; }
want=$(stamp_of)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.xtra-ds-stamp" 2>/dev/null)" = "$want" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

echo "[setup] creating virtual environment in $VENV"
"$PY" -m venv "$VENV"
# (the grep drops pip's notes about unreadable local index folders of some machines)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }

# torch first, so that deepspeed's dependency on torch is already satisfied and pip never
# reaches for a (multi-GB) CUDA build on a CPU machine.
echo "[setup] installing $TORCH_SPEC"
pip install -q "$TORCH_SPEC"
echo "[setup] installing xtra-ds and its dependencies"
# The constraint keeps every later resolution on the torch just installed.
"$VENV/bin/python" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$VENV/torch-constraint.txt"
pip install -q -c "$VENV/torch-constraint.txt" -e ".[dev]"

if [ "${PILLOW_SIMD:-1}" = "1" ]; then
    VENV="$VENV" bash scripts/install_pillow_simd.sh
fi
"$VENV/bin/python" -c "from xtra_ds.data.format import pil_info; print('[setup] imaging library:', pil_info())"
echo "$want" > "$VENV/.xtra-ds-stamp"
echo "[setup] done: $VENV"
