#!/usr/bin/env bash
# Install (launch/setup.sh --test), then run the whole test suite, slow tests included (CI runs this).
#   bash launch/test.sh                 # everything: about 20 minutes on 2 CPU cores (605 tests in 17:27 from a clean clone)
#   bash launch/test.sh -m "not slow"   # the quick part, what a plain `pytest` runs (576 tests in 4:52)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
# shellcheck disable=SC1091
. "${PTRAIN_VENV:-.venv}/bin/activate"
if [ $# -eq 0 ]; then set -- -m "slow or not slow"; fi
exec python -m pytest -q -p no:cacheprovider "$@"
