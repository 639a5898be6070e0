#!/usr/bin/env bash
# Run the whole test suite in ./.venv. pytest's exit code 5 ("no tests collected") is a failure
# here too: an empty run must never look green.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -p no:cacheprovider "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$code"
