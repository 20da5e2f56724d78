#!/usr/bin/env bash
# venv.sh DIR: make the peers' Python virtual environment in DIR (if absent) and install
# requirements.txt (beside this script) into it. Idempotent: a second run only lets pip
# confirm that everything is already installed. pip's output goes to stderr; the last
# (only) line on stdout is the path of the venv's python, e.g.
#   PY=$(node/benches/peers/venv.sh /tmp/peers-venv | tail -n1)
#   "$PY" node/benches/peers/peers.py --data ... --out ...
# The interpreter used to create the venv is $PYTHON (default python3); it must be
# Python 3.10..3.14 (smartnoise-sql's range; tested with 3.11.7).
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

mkdir -p "$1"
dir="$(cd "$1" && pwd)"
py="$dir/bin/python"

if [ ! -x "$py" ]; then
    "$python" - <<'PYEOF' >&2
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 14)):
    sys.exit(f"venv.sh: need Python 3.10..3.14, {sys.executable} is {sys.version.split()[0]}")
PYEOF
    echo "venv.sh: creating $dir" >&2
    "$python" -m venv "$dir" >&2
fi

"$py" -m pip install --disable-pip-version-check --quiet -r "$req" >&2
# Fail here, not in the benchmark, if the resolved set does not import.
"$py" -c 'import snsql, opendp.prelude, polars, pandas, numpy' >&2

echo "$py"
