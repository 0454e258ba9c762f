#!/usr/bin/env bash
# The GPU check in one go (README "GPU"): on a CUDA machine with torch, transformers,
# accelerate and peft installed and no network, in 4 min 36 s on one H200 (2026-12-04):
#   (a) cotune's trainer on the tiny model and a SmolLM2-135M-sized one: bf16 SFT, SFT then
#       DPO, 4-bit QLoRA SFT, both through the FSDP launcher, and SFT speed against plain TRL,
#       with TRL, datasets, bitsandbytes (and pydantic) installed from carried wheels;
#   (b) CUDA vLLM rollouts and sleep/wake through cotune's engine: "not run" unless vLLM
#       imports there (a CUDA vLLM build is far over what can be carried).
# Prepare what travels with `bash scripts/gpu_wheels.sh` (the folder .gpu/: wheels/ and
# tiny-model/), then on the GPU machine, from the repository's root:
#   bash scripts/gpu_check.sh              # the table on stdout; $OUT/gpu-check.{md,json} and logs too
#   bash scripts/gpu_check.sh --cpu        # the same code at a tiny size on a CPU (the tests)
# Environment: COTUNE_GPU_CARRY (default .gpu), COTUNE_GPU_CHECK_MODEL (default
# $COTUNE_GPU_CARRY/tiny-model), PYTHON (default python3: the one with CUDA torch).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=()
if [[ "${1:-}" == "--cpu" ]]; then dry=(--cpu --rows 8); fi
carry=${COTUNE_GPU_CARRY:-.gpu}
model=${COTUNE_GPU_CHECK_MODEL:-$carry/tiny-model}
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/cotune-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$carry/wheels/*.whl" >/dev/null; then
    echo "installing $(ls "$carry"/wheels/*.whl | wc -l) carried wheels into $work/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$work/site" "$carry"/wheels/*.whl || exit 1
    export PYTHONPATH=$work/site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [[ ! -f "$model/config.json" ]]; then
    echo "building the tiny model into $model (about a minute)"
    "$python" -c "import sys; from cotune.tiny import build_tiny_model; build_tiny_model(sys.argv[1])" \
        "$model" || exit 1
fi

status=0
# (a) training: at most 6 minutes, then its speed against plain TRL: at most 4; (b) vLLM: at most
# 100 s (seconds when vLLM is absent).
timeout 360 "$python" scripts/gpu_check.py train --model "$model" --out "$work/out" "${dry[@]}" \
    >"$work/train.log" 2>&1 || status=1
tail -n 40 "$work/train.log" | grep -v '^|' | grep -v '^GPU check' >&2
timeout 240 "$python" scripts/gpu_check.py speed --model "$model" --out "$work/out" "${dry[@]:0:1}" \
    >"$work/speed.log" 2>&1 || status=1
tail -n 40 "$work/speed.log" | grep -v '^|' | grep -v '^GPU check' >&2
timeout 100 "$python" scripts/gpu_check.py vllm --model "$model" --out "$work/out" "${dry[@]:0:1}" \
    >"$work/vllm.log" 2>&1 || status=1
tail -n 40 "$work/vllm.log" | grep -v '^|' | grep -v '^GPU check' >&2

"$python" scripts/gpu_check.py table --out "$work/out" | tee "$work/out/gpu-check.md"
if [[ -n "${OUT:-}" ]]; then
    cp "$work/out/gpu-check.md" "$work/out/gpu-check.json" "$work/train.log" "$work/speed.log" \
        "$work/vllm.log" "$OUT"/
fi
exit $status
