#!/usr/bin/env bash
# Install the anchors, each into a venv of its own (never into minisup's
# dependencies): circus 0.19.0 and supervisor 4.3.0.  Where: $MINISUP_BENCH
# (default ~/.cache/minisup-bench).  The bench scripts look there.
set -euo pipefail
root="${MINISUP_BENCH:-$HOME/.cache/minisup-bench}"
mkdir -p "$root"
for spec in circus==0.19.0 supervisor==4.3.0; do
    venv="$root/${spec%%==*}"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "$spec"
done
echo "anchors installed under $root"
