"""The TRL trainers: SFT on a conversational prompt-completion dataset (loss on the completion
up to its end-of-turn token), DPO on preference pairs, and the micro-batching both share
(``rows_per_pass``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.spec.job import TrainConfig
from cotune.training.base_model import _use_bf16
from cotune.training.rows import DPOPair, Progress, SFTRow


def _without_printer(trainer: Any) -> Any:
    """Drop the callback that prints every log dict to stdout (``disable_tqdm`` adds it)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def rows_per_pass(config: TrainConfig, longest: int, sequences_per_row: int = 1) -> int:
    """Rows per forward pass: the largest divisor of ``batch_size`` whose padded tokens fit
    ``micro_batch_tokens`` (at least one). Activations grow with rows x length (and attention
    with length squared): eight 800-token rows took 19 GiB in one SFT pass of SmolLM2-135M on a
    CPU. A divisor keeps every step at ``batch_size`` rows, as without accumulation."""
    padded = min(longest, config.max_length) * sequences_per_row
    fitting = [
        rows
        for rows in range(1, config.batch_size + 1)
        if config.batch_size % rows == 0 and rows * padded <= config.micro_batch_tokens
    ]
    return max(fitting, default=1)


def _longest_conversation(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> int:
    """Tokens of the longest conversation, as the chat template renders it."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    if not texts:
        return 0
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _trainer_args(
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    learning_rate: float,
    per_pass: int,
) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig."""
    return dict(
        output_dir=str(run_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=per_pass,
        gradient_accumulation_steps=config.batch_size // per_pass,
        learning_rate=learning_rate,
        max_length=config.max_length,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # TRL defaults to bf16 and gradient checkpointing: on a CPU both make a step ~15x slower
        # (DESIGN.md §7). On a GPU, bf16 where supported; checkpointing only for QLoRA, whose
        # point is fitting a large base in little memory.
        bf16=_use_bf16(gpu),
        fp16=False,
        gradient_checkpointing=bool(gpu and config.qlora),
        use_cpu=not gpu,
    )


def _sft_trainer(
    model: Any,
    tokenizer: Any,
    rows: list[SFTRow],
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    peft_config: Any = None,
    callbacks: list[Any] | None = None,
) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # Conversational prompt-completion: TRL tokenises the prompt with the generation prompt
    # and the prompt+completion, and masks everything before the completion (labels -100).
    dataset = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in row.messages],
                "completion": [{"role": "assistant", "content": row.completion}],
            }
            for row in rows
        ]
    )
    longest = _longest_conversation(
        tokenizer,
        [[*row.messages, {"role": "assistant", "content": row.completion}] for row in rows],
    )
    args = SFTConfig(
        **_trainer_args(
            config,
            run_dir,
            seed=seed,
            gpu=gpu,
            learning_rate=config.learning_rate,
            per_pass=rows_per_pass(config, longest),
        ),
        completion_only_loss=True,  # explicit: loss on completion tokens only
        assistant_only_loss=False,  # needs {% generation %} markers; the completion mask suffices
        packing=False,
        shuffle_dataset=False,  # the Trainer's seeded sampler shuffles each epoch
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train_dataset = _no_loss_after_end_of_turn(trainer.train_dataset, tokenizer)
    return _without_printer(trainer)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


def _no_loss_after_end_of_turn(dataset: Any, tokenizer: Any) -> Any:
    """Labels -100 after the completion's first end-of-turn token. Chat templates render a
    turn as ``...<|im_end|>\n``; generation stops at the end-of-turn token, so what follows it
    is never generated, and a model that never saw it there (a small or base model) would
    spend the loss on it."""
    stops = _end_of_turn_ids(tokenizer)

    def mask(example: dict[str, Any]) -> dict[str, Any]:
        labels = list(example["labels"])
        for i, label in enumerate(labels):
            if label != -100 and label in stops:
                labels[i + 1 :] = [-100] * (len(labels) - i - 1)
                break
        return {"labels": labels}

    if "labels" not in dataset.column_names:  # another TRL layout: leave it as TRL made it
        return dataset
    return dataset.map(mask, desc="Masking what follows the end of turn")


def _dpo_trainer(
    model: Any,
    tokenizer: Any,
    pairs: list[DPOPair],
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    callbacks: list[Any] | None = None,
) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in pair.messages],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
            for pair in pairs
        ]
    )
    learning_rate = config.dpo_learning_rate or config.learning_rate / 2
    longest = _longest_conversation(
        tokenizer,
        [
            [*pair.messages, {"role": "assistant", "content": answer}]
            for pair in pairs
            for answer in (pair.chosen, pair.rejected)
        ],
    )
    args = DPOConfig(
        **_trainer_args(
            config,
            run_dir,
            seed=seed,
            gpu=gpu,
            learning_rate=learning_rate,
            per_pass=rows_per_pass(config, longest, sequences_per_row=2),
        ),
        beta=config.dpo_beta,
    )
    # No ref_model and no peft_config: TRL copies the loaded `default` adapter into a frozen
    # `ref` adapter and trains `default` only (DESIGN.md §7).
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return _without_printer(trainer)


def _dpo_tokens(dataset: Any, config: TrainConfig) -> int:
    """Tokens of prompt+chosen and prompt+rejected per pair, truncated as the collator does."""
    total = 0
    for example in dataset:
        prompt = len(example["prompt_ids"])
        for key in ("chosen_ids", "rejected_ids"):
            total += min(prompt + len(example[key]), config.max_length)
    return total


def _loss_callback(losses: list[float], stage: str, say: Progress) -> Any:
    from transformers import TrainerCallback

    class _Losses(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                say(f"{stage}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")

    return _Losses()
