"""LoRA training of one component: TRL SFT from the base model, then DPO on top of it.

``train_adapter`` turns a component's SFT rows (rendered prompt messages -> target output) and
DPO pairs into one PEFT LoRA adapter folder holding only ``adapter_config.json`` and
``adapter_model.safetensors`` (DESIGN.md §5):

- SFT always starts from the base model (the loop passes the cumulative buffer each epoch), with
  LoRA on all linear layers, on a conversational prompt-completion dataset, so that the loss
  covers the completion tokens only: the assistant text, its end-of-turn token and whatever the
  chat template renders after it (a newline for ChatML). ``completion_mask_preview`` shows the
  labels exactly as the trainer's collator builds them.
- DPO, when the method is ``sft+dpo`` and pairs exist, continues training the SFT adapter
  against a frozen copy of itself (DESIGN.md §7): the SFT adapter is loaded trainable as
  ``default``, ``DPOTrainer`` adds the frozen reference adapter ``ref``, and only ``default`` is
  saved. (An adapter may never be named ``train``: that clashes with ``nn.Module.train``.)

Without a GPU, bf16 and gradient checkpointing are off (TRL turns both on by default; on a CPU a
step took 64 s with them and 4.2 s without). QLoRA (``TrainConfig.qlora``) loads the base in
4-bit through bitsandbytes and needs a CUDA GPU; it cannot run on a CPU-only machine, so it is
not exercised by the CPU test suite.

Runs are deterministic for a seed on one machine with a fixed torch thread count (tests compare
adapters with atol 1e-5); a different thread count may change the last bits.


Modules: ``rows`` (``SFTRow``, ``DPOPair``, ``TrainResult``, the adapter's files), ``base_model``
(device check, loading the base and tokenizer, the LoRA config, freeing memory), ``trainers``
(the TRL SFT and DPO trainers, ``rows_per_pass``), ``adapter`` (``train_adapter``, the
export, ``completion_mask_preview``, ``adapter_weights``) and ``fsdp`` (one adapter over several
GPUs through ``accelerate launch``; written, never run on several GPUs).

torch, transformers, datasets, peft and trl are imported inside the functions, so importing this
package costs nothing.
"""

from cotune.training.adapter import adapter_weights, completion_mask_preview, train_adapter
from cotune.training.rows import (
    ADAPTER_FILES,
    ADAPTER_NAME,
    DPOPair,
    Progress,
    SFTRow,
    TrainResult,
)
from cotune.training.trainers import END_OF_TURN_TOKENS, rows_per_pass

__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_NAME",
    "END_OF_TURN_TOKENS",
    "DPOPair",
    "Progress",
    "SFTRow",
    "TrainResult",
    "adapter_weights",
    "completion_mask_preview",
    "rows_per_pass",
    "train_adapter",
]
