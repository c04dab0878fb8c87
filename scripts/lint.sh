#!/usr/bin/env bash
# The code's rules (pyproject.toml): ruff (pyflakes, pycodestyle, import order, line length, no print outside the
# CLI) over the package, tests, benchmarks and examples, and mypy over the package. Fails on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
