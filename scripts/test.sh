#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the code's rules (scripts/lint.sh: ruff and mypy), then run the whole test suite:
# two workers (pytest-xdist), each taking whole test files, so a file's module fixtures are built once; the 25
# slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest -q -ra -n 2 --dist loadfile --durations=25 "$@"
