#!/usr/bin/env bash
# Install the two anchors (mergekit, FusionBench) into their own venv, for benchmarking only.
# They are never runtime dependencies of distac. The constraint file pins torch==2.13.0 so pip
# does not pull a second torch build; never install them without it.
set -euo pipefail
VENV="${ANCHORS_VENV:-/tmp/anchors-venv}"
CONSTRAINT="${CONSTRAINT:-/tmp/c.txt}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$CONSTRAINT" torch==2.13.0 mergekit fusion-bench psutil
"$VENV/bin/pip" freeze > "$VENV/freeze.txt"
echo "anchors installed in $VENV ($(grep -Ei '^(mergekit|fusion-bench|torch)==' "$VENV/freeze.txt" | tr '\n' ' '))"
