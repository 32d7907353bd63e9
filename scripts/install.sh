#!/usr/bin/env bash
# Installs dsel and its dependencies. CPU by default: pins the CPU build of torch available here.
# DSEL_DEVICE=gpu skips the pin and takes the registry's CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DSEL_DEVICE:-cpu}" = "cpu" ]; then
  python3 -m pip install -q "torch==2.13.0"
fi
python3 -m pip install -q -e ".[test]"
