"""Faster LoRA ops for vLLM on CPU: one matmul per adapter instead of one weight copy per token.

vLLM's PyTorch-native punica ops (``vllm.lora.ops.torch_ops``, used by ``PunicaWrapperCPU``)
compute a batch's LoRA products as ``einsum("bi, boi -> bo", x, W[indices])``: they gather a
full ``rank x hidden`` weight matrix for every token before multiplying. On a prefill of a few
thousand tokens that copy dominates the step; on squad-rag's ~700-token prompts an adapter
made SmolLM2-135M evaluation several times slower than the base model
(``benchmarks/speed.py``'s adapter row measures it). The ops here give the same result with
one matrix product per distinct adapter in the batch, taking the same rows (an index of -1
selects the last slot, as indexing does in the originals). Shapes the grouped path does not
expect fall back to the original einsum.

:func:`install` swaps them into ``vllm.lora.punica_wrapper.punica_cpu``, whose wrapper looks
the ops up at call time. It is idempotent, and a vLLM without that module is left alone.
"""

from __future__ import annotations

from typing import Any

_INSTALLED_FLAG = "_cotune_grouped_lora_ops"
OPS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


def install() -> bool:
    """Use the grouped ops in vLLM's CPU punica wrapper; True when they are in place."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if getattr(punica_cpu, _INSTALLED_FLAG, False):
        return True
    if not all(hasattr(punica_cpu, name) for name in OPS):
        return False  # a vLLM whose CPU wrapper is built differently: keep its own ops
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    setattr(punica_cpu, _INSTALLED_FLAG, True)
    return True


def uninstall() -> None:
    """Put vLLM's own ops back (``benchmarks/speed.py`` compares the two)."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    for name in OPS:
        setattr(punica_cpu, name, getattr(torch_ops, name))
    setattr(punica_cpu, _INSTALLED_FLAG, False)


def lora_products(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """``einsum("bi, boi -> bo", inputs, weights[indices])`` in ``dtype``, as one matrix
    product per distinct index. ``weights``: ``[slots, out, in]`` or ``[slots, 1, out, in]``."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    inputs = inputs.to(dtype=dtype)
    expected = inputs.dim() == 2 and indices.dim() == 1 and indices.shape[0] == inputs.shape[0]
    if not expected or torch.compiler.is_compiling():  # no data-dependent loop in a graph
        return torch.einsum("bi, boi -> bo", inputs, weights[indices].to(dtype=dtype))
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return inputs @ weights[slots[0]].to(dtype=dtype).t()
    out = torch.empty((inputs.shape[0], weights.shape[1]), dtype=dtype, device=inputs.device)
    for slot in slots:
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out[rows] = inputs[rows] @ weights[slot].to(dtype=dtype).t()
    return out


# The six ops below keep the signatures and output handling of vllm.lora.ops.torch_ops.


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling=1.0
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def _per_token(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
    import torch

    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs: Any,
    lora_a_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
    )
