#!/usr/bin/env bash
# Install pgdurable into .venv, then start the embedded PostgreSQL with the schema and a
# worker, and run a first workflow. Ctrl-C stops the worker, then PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/pgdurable up --run examples/hello.sql "$@"
