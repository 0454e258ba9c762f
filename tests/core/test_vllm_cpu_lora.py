"""The grouped CPU LoRA ops give what vLLM's own PyTorch ops give, and the engine uses them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cotune.engines import vllm_cpu_lora as grouped

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

SLOTS, RANK, HIDDEN = 4, 8, 24


def _weights(out: int, inner: int, *, four_d: bool = True) -> torch.Tensor:
    shape = (SLOTS, 1, out, inner) if four_d else (SLOTS, out, inner)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(out * inner))


def _indices(tokens: int) -> torch.Tensor:
    # Several adapters, a run of one adapter, and -1 (no adapter: the last slot, as indexing).
    pattern = [0, 2, 2, -1, 1, 1, 1, 3]
    return torch.tensor([pattern[i % len(pattern)] for i in range(tokens)])


@pytest.mark.parametrize("indices", [_indices(13), torch.full((13,), 2), torch.full((13,), -1)])
@pytest.mark.parametrize("four_d", [True, False])
def test_products_equal_the_per_token_einsum(indices: torch.Tensor, four_d: bool) -> None:
    x = torch.randn(13, HIDDEN)
    w = _weights(RANK, HIDDEN, four_d=four_d)
    flat = w.squeeze(1) if four_d else w
    want = torch.einsum("bi, boi -> bo", x, flat[indices])
    got = grouped.lora_products(x, w, indices, torch.float32)
    torch.testing.assert_close(got, want)


def test_unexpected_shapes_fall_back_to_the_einsum() -> None:
    x = torch.randn(1, HIDDEN)  # one row against three indices: einsum broadcasts it
    w = _weights(RANK, HIDDEN)
    indices = torch.tensor([0, 1, 0])
    want = torch.einsum("bi, boi -> bo", x, w.squeeze(1)[indices])
    torch.testing.assert_close(grouped.lora_products(x, w, indices, torch.float32), want)


def _every_op(module: Any, add_inputs: bool) -> list[torch.Tensor]:
    """Each of the six ops once, on the same inputs, through ``module``."""
    tokens = 11
    indices = _indices(tokens)
    x_in, x_rank = torch.randn(tokens, HIDDEN), torch.randn(tokens, RANK)
    shrink_w, expand_w = _weights(RANK, HIDDEN), _weights(HIDDEN, RANK)
    # Three sequences (prefill): lengths 4, 5, 2 with adapters 1, none (-1), 3.
    meta = (torch.tensor([0, 4, 9]), torch.tensor([4, 5, 2]), torch.tensor([1, -1, 3]), 3, 5, 11)
    outs = [
        torch.zeros(tokens, RANK),
        torch.ones(tokens, HIDDEN + 3),  # wider than the adapter's output: common_len applies
        torch.ones(tokens, HIDDEN * 2),
        torch.zeros(tokens, RANK),
        torch.ones(tokens, HIDDEN),
        torch.ones(tokens, HIDDEN * 2),
    ]
    module.bgmv_shrink(x_in, shrink_w, outs[0], indices, 0.5)
    module.bgmv_expand(x_rank, expand_w, outs[1], indices, add_inputs)
    module.bgmv_expand_slice(x_rank, expand_w, outs[2], indices, HIDDEN, HIDDEN, add_inputs)
    module.sgmv_shrink(x_in, shrink_w, outs[3], *meta, 2.0)
    module.sgmv_expand(x_rank, expand_w, outs[4], *meta, add_inputs)
    module.sgmv_expand_slice(x_rank, expand_w, outs[5], *meta, 0, HIDDEN, add_inputs)
    return outs


@pytest.mark.parametrize("add_inputs", [True, False])
def test_each_op_matches_vllms(add_inputs: bool) -> None:
    torch.manual_seed(0)
    ours = _every_op(grouped, add_inputs)
    torch.manual_seed(0)
    theirs = _every_op(torch_ops, add_inputs)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


def test_the_engine_installs_them_once_and_uninstall_restores(vllm_engine: Any) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.sgmv_shrink is grouped.sgmv_shrink  # the engine fixture installed them
    try:
        grouped.uninstall()
        assert punica_cpu.sgmv_shrink is torch_ops.sgmv_shrink
        assert grouped.install() and grouped.install()
        assert all(getattr(punica_cpu, name) is getattr(grouped, name) for name in grouped.OPS)
    finally:
        grouped.install()


def test_the_ops_benchmark_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import speed_lora_ops
    finally:
        sys.path.pop(0)
    assert speed_lora_ops.main(["--tokens", "16", "--repeat", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")
    assert float(cells[4]) < 1e-3  # the same products, up to float rounding
