#!/usr/bin/env bash
# Set up a virtualenv with pgdurable and its test tools, then run lint, types and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev,embeddings,tracing]'
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
# Two processes, each with its own PostgreSQL, a test file each at a time: most tests wait on
# a server, a worker or a timer rather than use a core. PGDURABLE_TEST_PROCESSES=0 runs them
# in this one.
.venv/bin/pytest -n "${PGDURABLE_TEST_PROCESSES:-2}" --dist loadfile "$@"
