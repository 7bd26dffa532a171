#!/usr/bin/env bash
# Install ptrain and its dependencies into a virtualenv (default .venv). Idempotent: a second run is quick.
#
#   bash launch/setup.sh            # runtime dependencies
#   bash launch/setup.sh --test     # + test dependencies (pytest, open_clip's tokenizer as a reference)
#
# torch is installed FIRST, so that nothing pulls a different build later:
#   TORCH_SPEC=torch==2.13.0 (default)  on a CPU machine this takes the local CPU wheel when one is offered;
#                                       elsewhere it is PyPI's default build (CUDA on Linux x86_64)
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"   a specific CUDA build
#   PTRAIN_VENV=/path/to/venv           use (or create) another virtualenv
# An already installed torch is kept, whatever its version: ptrain works with any recent torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PTRAIN_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
# pin the torch we have, so that no dependency (deepspeed, ...) swaps it for another build
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$constraints"
python -m pip install -q -c "$constraints" -e ".[test]"
if [ "${1:-}" = "--test" ]; then
  # open_clip is only the tokenizer reference of the tests; --no-deps: its torchvision would pull another torch
  python -m pip show open_clip_torch >/dev/null 2>&1 || python -m pip install -q --no-deps open_clip_torch
fi
echo "ptrain installed in $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
