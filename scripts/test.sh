#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the code's rules (scripts/lint.sh: ruff and mypy), then run the whole test suite;
# the 25 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
