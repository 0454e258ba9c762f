#!/usr/bin/env bash
# What scripts/gpu_check.sh needs beside the GPU machine's own packages (torch, transformers,
# accelerate, peft, numpy, pandas, pyarrow, ...), into .gpu/ (ignored by git):
#   .gpu/wheels/      TRL, datasets and its dill/multiprocess, bitsandbytes, pydantic and its
#                     parts, for CPython 3.12 on x86-64 Linux (about 48 MB, most of it
#                     bitsandbytes' CUDA kernels)
#   .gpu/tiny-model/  the tiny test model (COTUNE_TEST_CACHE's, else built by cotune/tiny.py)
# The whole carried tree must stay under 64 MiB: this prints the size.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=${COTUNE_GPU_CARRY:-.gpu}
python=${PYTHON:-python3}
mkdir -p "$carry/wheels"
# The versions this repository's CPU environment runs (pydantic and pydantic-core as a pair).
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$carry/wheels" \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
cache=${COTUNE_TEST_CACHE:-.cache/tests}
if [[ ! -f "$carry/tiny-model/config.json" ]]; then
    found=$(ls -d "$cache"/tiny-model-* 2>/dev/null | tail -n 1 || true)
    if [[ -n "$found" ]]; then
        cp -r "$found" "$carry/tiny-model"
    else
        "$python" -c "import sys; from cotune.tiny import build_tiny_model; build_tiny_model(sys.argv[1])" \
            "$carry/tiny-model"
    fi
fi
du -sh "$carry/wheels" "$carry/tiny-model"
du -sh "$carry"
echo "tracked files: $(git ls-files -z | du -ch --files0-from=- | tail -n 1 | cut -f1)"
