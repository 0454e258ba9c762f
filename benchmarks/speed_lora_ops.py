"""LoRA ops on CPU: vLLM's PyTorch ops against cotune's grouped ops, on one layer's shapes.

A prefill of ``T`` tokens through one SmolLM2-135M decoder layer's seven LoRA'd projections
(q, k, v, o, gate, up, down; rank 16 in a rank-32 engine, 4 adapter slots), shrink then
expand, all tokens on one adapter (a batch of one component's prompts). The same inputs go
through ``vllm.lora.ops.torch_ops`` and ``cotune.engines.vllm_cpu_lora``; the table gives the
milliseconds per layer (best of ``--repeat``) and checks that the outputs agree.

    python benchmarks/speed_lora_ops.py                  # T = 64, 700, 2800
    python benchmarks/speed_lora_ops.py --tokens 32 --repeat 1   # the test's size
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import machine

# (in, out) of each LoRA'd projection of one SmolLM2-135M layer
PROJECTIONS = {
    "q": (576, 576),
    "k": (576, 192),
    "v": (576, 192),
    "o": (576, 576),
    "gate": (576, 1536),
    "up": (576, 1536),
    "down": (1536, 576),
}
MAX_RANK, SLOTS = 32, 4


def layer_seconds(ops: Any, tokens: int, repeat: int) -> tuple[float, list[Any]]:
    """Best wall time of one layer's LoRA shrink + expand through ``ops``, and its outputs."""
    import torch

    gen = torch.Generator().manual_seed(tokens)
    shapes = {name: (i, o) for name, (i, o) in PROJECTIONS.items()}
    a = {n: torch.randn(SLOTS, 1, MAX_RANK, i, generator=gen) for n, (i, _) in shapes.items()}
    b = {n: torch.randn(SLOTS, 1, o, MAX_RANK, generator=gen) for n, (_, o) in shapes.items()}
    x = {n: torch.randn(tokens, i, generator=gen) for n, (i, _) in shapes.items()}
    # One sequence of ``tokens`` on adapter slot 1 (vLLM's prefill metadata).
    meta = (torch.tensor([0]), torch.tensor([tokens]), torch.tensor([1]), 1, tokens, tokens)
    best, outputs = float("inf"), []
    for _ in range(repeat):
        outputs = []
        started = time.perf_counter()
        for name, (_, out_dim) in shapes.items():
            rank_out = torch.zeros(tokens, MAX_RANK)
            ops.sgmv_shrink(x[name], a[name], rank_out, *meta, 1.0)
            y = torch.zeros(tokens, out_dim)
            ops.sgmv_expand(rank_out, b[name], y, *meta, True)
            outputs.append(y)
        best = min(best, time.perf_counter() - started)
    return best, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[64, 700, 2800])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from vllm.lora.ops import torch_ops

    from cotune.engines import vllm_cpu_lora

    torch.set_num_threads(min(os.cpu_count() or 2, 16))
    lines = [
        f"LoRA ops per SmolLM2-135M layer (7 projections, shrink + expand, one adapter), "
        f"{datetime.date.today()}, {machine.describe()}, torch threads {torch.get_num_threads()}",
        "",
        "| prefill tokens | vLLM torch ops (ms) | cotune grouped ops (ms) | speed-up | "
        "max abs diff |",
        "| --- | --- | --- | --- | --- |",
    ]
    for tokens in args.tokens:
        theirs, want = layer_seconds(torch_ops, tokens, args.repeat)
        ours, got = layer_seconds(vllm_cpu_lora, tokens, args.repeat)
        diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
        lines.append(
            f"| {tokens} | {theirs * 1e3:.1f} | {ours * 1e3:.1f} | {theirs / ours:.1f}x | "
            f"{diff:.2e} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
