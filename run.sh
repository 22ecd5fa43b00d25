#!/usr/bin/env bash
# rockq's two set-up commands, for a fresh machine with Python 3.10+:
#
#   bash run.sh demo    quantise the built-in example network and show the report
#   bash run.sh test    run the test suite
#
# The first run creates .venv with torch's CPU build and rockq (with its test, lint,
# Rockpool and examples extras); later runs reuse it. Extra arguments go to the command, e.g.
# `bash run.sh test -m "not slow"`. Set TORCH_SPEC to install another torch build.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.rockq-installed

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setting up .venv (first run only) ..." >&2
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet "$torch_spec"
    .venv/bin/python -m pip install --quiet -e ".[test,lint,rockpool,examples]"
    touch "$stamp"
fi

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo) exec .venv/bin/rockq demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    lint)
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        exec .venv/bin/mypy transform_core cli
        ;;
    *)
        echo "usage: bash run.sh demo|test|lint [arguments]" >&2
        exit 2
        ;;
esac
