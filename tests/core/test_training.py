"""LoRA training with real TRL SFT/DPO and peft on the tiny model; adapters served by vLLM."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from cotune.engines.base import GenerationRequest
from cotune.errors import CotuneError
from cotune.spec.job import TrainConfig
from cotune.tiny import ANSWER_PROMPT, make_world
from cotune.training import (
    ADAPTER_FILES,
    DPOPair,
    SFTRow,
    TrainResult,
    adapter_weights,
    completion_mask_preview,
    rows_per_pass,
    train_adapter,
)

WORLD = make_world()
KEYS = sorted(WORLD.facts)
TARGET = "blue"  # the distinctive answer the SFT adapter learns to give to every question
# Small and fast: 32 rows x 2 epochs at batch 8 = 8 steps; a high rate so 8 steps move greedy
# output on the tiny model.
CONFIG = TrainConfig(
    method="sft", lora_r=8, lora_alpha=16, learning_rate=2e-2, epochs=2, batch_size=8
)
ATOL = 1e-5  # same seed and rows -> same adapter weights, to this tolerance


def answer_messages(key: str, seed: int = 0) -> list[dict[str, str]]:
    """The tiny-kb answer component's prompt: three numbered passages, the right one first."""
    rng = random.Random(f"{key}-{seed}")
    others = rng.sample([k for k in KEYS if k != key], 2)
    passages = [f"the color of {k} is {WORLD.facts[k]}." for k in [key, *others]]
    rendered = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(passages))
    content = ANSWER_PROMPT.format(passages=rendered, question=WORLD.question(key))
    return [{"role": "user", "content": content}]


TRAIN_KEYS = KEYS[:32]
HELD_OUT = [k for k in KEYS[100:140] if WORLD.facts[k] != TARGET][:12]
ROWS = [SFTRow(answer_messages(k), TARGET, source="bootstrap") for k in TRAIN_KEYS]
PAIRS = [
    DPOPair(answer_messages(k), chosen=TARGET, rejected=WORLD.facts[k])
    for k in TRAIN_KEYS[:16]
    if WORLD.facts[k] != TARGET
]


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    messages: list[str] = []
    out = tmp_path_factory.mktemp("sft") / "adapter"
    result = train_adapter(
        tiny_model_dir, ROWS, PAIRS, CONFIG, out, seed=0, progress=messages.append
    )
    assert any(m.startswith("sft: step 1/") for m in messages), messages
    return result


@pytest.fixture(scope="module")
def dpo_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    config = CONFIG.model_copy(update={"method": "sft+dpo"})
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    return train_adapter(tiny_model_dir, ROWS, PAIRS, config, out, seed=0)


def _folder_is_clean(adapter_dir: Path) -> None:
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(ADAPTER_FILES)
    # Nothing left beside it (no partial scratch folder) and no pickle anywhere.
    assert [p.name for p in adapter_dir.parent.iterdir()] == [adapter_dir.name]
    for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle"):
        assert not list(adapter_dir.parent.rglob(pattern)), pattern


def test_sft_labels_cover_the_completion_only(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = [
        SFTRow(answer_messages(KEYS[0]), "blue"),
        SFTRow(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Write a search query for: what is x?"},
            ],
            "color of zorpa",
        ),
    ]
    previews = completion_mask_preview(tiny_model_dir, rows)
    assert len(previews) == len(rows)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, (input_ids, labels) in zip(rows, previews, strict=True):
        assert len(input_ids) == len(labels)
        prompt_ids = tokenizer.apply_chat_template(
            row.messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        n = len(prompt_ids)
        assert input_ids[:n] == prompt_ids
        assert all(label == -100 for label in labels[:n]), "a prompt token is supervised"
        supervised = [t for t, label in zip(input_ids, labels, strict=True) if label != -100]
        assert labels[n : n + len(supervised)] == input_ids[n : n + len(supervised)]
        assert supervised[-1] == eos  # the model learns to stop, and nothing after that:
        assert tokenizer.decode(supervised) == row.completion + "<|im_end|>"
        # the chat template's "\n" after <|im_end|> is in the input but never supervised
        assert tokenizer.decode(input_ids[n:]) == row.completion + "<|im_end|>\n"
        assert labels[n + len(supervised) :] == [-100]


def test_sft_trains_lora_and_writes_only_the_adapter(
    sft_adapter: TrainResult, tiny_model_dir: Path
) -> None:
    result = sft_adapter
    _folder_is_clean(result.adapter_dir)
    # method "sft": the pairs are ignored
    assert result.dpo_steps == 0 and result.dpo_losses == []
    assert result.sft_steps == math.ceil(len(ROWS) / CONFIG.batch_size) * CONFIG.epochs
    assert len(result.sft_losses) == result.sft_steps
    assert all(math.isfinite(loss) for loss in result.sft_losses)
    assert result.sft_losses[-1] < result.sft_losses[0]
    assert result.seconds > 0

    weights = adapter_weights(result.adapter_dir)
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= modules

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == CONFIG.lora_r and config["lora_alpha"] == CONFIG.lora_alpha
    assert config["peft_type"] == "LORA"
    # Adapters are downloaded: the base is named, the server's folder is not.
    assert config["base_model_name_or_path"] == tiny_model_dir.name

    # Trained tokens: prompt + completion of every row, every epoch.
    lengths = [len(ids) for ids, _ in completion_mask_preview(tiny_model_dir, ROWS)]
    assert result.trained_tokens == CONFIG.epochs * sum(lengths)


def test_sft_then_dpo_gives_one_adapter_that_moved(
    dpo_adapter: TrainResult, sft_adapter: TrainResult
) -> None:
    result = dpo_adapter
    _folder_is_clean(result.adapter_dir)
    assert result.sft_losses == pytest.approx(sft_adapter.sft_losses)  # same SFT run
    assert result.dpo_steps == math.ceil(len(PAIRS) / CONFIG.batch_size) * CONFIG.epochs
    assert len(result.dpo_losses) == result.dpo_steps
    assert all(math.isfinite(loss) for loss in result.dpo_losses)
    assert result.dpo_losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert result.trained_tokens > sft_adapter.trained_tokens

    sft, dpo = adapter_weights(sft_adapter.adapter_dir), adapter_weights(result.adapter_dir)
    assert sorted(dpo) == sorted(sft)  # only `default` was saved, no `ref` copy
    assert not any(".ref." in name for name in dpo)
    moved = max(float((dpo[name] - sft[name]).abs().max()) for name in sft)
    assert moved > 10 * ATOL


def test_adapter_loads_in_peft(sft_adapter: TrainResult, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(sft_adapter.adapter_dir))
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_adapters_serve_in_vllm_and_change_greedy_output(
    sft_adapter: TrainResult, dpo_adapter: TrainResult, vllm_engine
) -> None:  # type: ignore[no-untyped-def]
    requests = [GenerationRequest(answer_messages(k), max_tokens=6) for k in HELD_OUT]
    base = [r.text.strip() for r in vllm_engine.generate(requests)]
    tuned = [
        r.text.strip() for r in vllm_engine.generate(requests, adapter=str(sft_adapter.adapter_dir))
    ]
    assert sum(t == TARGET for t in tuned) >= 0.8 * len(tuned), tuned
    assert sum(b == TARGET for b in base) <= 0.5 * len(base), base
    assert tuned != base
    after_dpo = vllm_engine.generate(requests, adapter=str(dpo_adapter.adapter_dir))
    assert len(after_dpo) == len(requests)


def test_qlora_without_cuda_is_refused_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "adapter"
    config = CONFIG.model_copy(update={"qlora": True})
    with pytest.raises(CotuneError, match="qlora needs a CUDA GPU"):
        train_adapter(tiny_model_dir, ROWS, [], config, out)
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_rows_same_weights(
    sft_adapter: TrainResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")  # an earlier attempt's leftovers are replaced
    again = train_adapter(tiny_model_dir, ROWS, [], CONFIG, out, seed=0)
    _folder_is_clean(out)
    assert again.sft_losses == pytest.approx(sft_adapter.sft_losses, abs=1e-4)
    first, second = adapter_weights(sft_adapter.adapter_dir), adapter_weights(out)
    assert sorted(first) == sorted(second)
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=ATOL, rtol=0)


def test_the_fsdp_rank_entry_point_trains_from_its_request(
    sft_adapter: TrainResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What a CPU can run of the FSDP path (training/fsdp.py, never run on several GPUs): the
    request file and one rank's ``main`` without the launcher give train_adapter's adapter."""
    import torch

    from cotune.training.fsdp import main, read_result, write_request

    out = tmp_path / "adapter"
    request = write_request(tmp_path, tiny_model_dir, ROWS, [], CONFIG, out, seed=0)
    main(str(request))
    result = read_result(tmp_path)
    assert result.adapter_dir == out and result.sft_steps == sft_adapter.sft_steps
    first, second = adapter_weights(sft_adapter.adapter_dir), adapter_weights(out)
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=ATOL, rtol=0)


def test_the_fsdp_launch_trains_one_rank_and_gathers_its_adapter(
    sft_adapter: TrainResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The real ``accelerate launch --use_fsdp`` (FSDP2, one process, gloo on a CPU; on an H200
    in README "GPU"): the same adapter tensors as a plain run, trained, from the same start
    (the first loss is measured before any update; the launch computes in bf16, so close, not
    equal, and the weights are not compared)."""
    from cotune.training.fsdp import train_adapter_fsdp

    result = train_adapter_fsdp(tiny_model_dir, ROWS, [], CONFIG, tmp_path / "a", gpus=1)
    assert result.sft_steps == sft_adapter.sft_steps
    assert math.isclose(result.sft_losses[0], sft_adapter.sft_losses[0], rel_tol=0.05)
    weights, plain = adapter_weights(result.adapter_dir), adapter_weights(sft_adapter.adapter_dir)
    assert {n: t.shape for n, t in weights.items()} == {n: t.shape for n, t in plain.items()}
    assert all(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)  # moved off 0


def test_every_rank_under_the_fsdp_launcher_is_distributed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One rank under ``--use_fsdp`` is wrapped all the same: it gathers its adapter."""
    from cotune.training.ranks import distributed

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate sets it in-process too
    assert not distributed()
    monkeypatch.setenv("LOCAL_RANK", "0")  # only the launcher sets this
    assert distributed()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed()


@pytest.mark.parametrize(
    ("batch_size", "longest", "sequences", "expected"),
    [
        (8, 100, 1, 8),  # short rows: the whole batch in one pass
        (8, 900, 1, 2),  # squad-rag's answer rows: 2 x 900 fits 2048, 4 x 900 does not
        (8, 900, 2, 1),  # DPO: chosen and rejected of a pair go through together
        (6, 600, 1, 3),  # a divisor of the batch: every step still sees 6 rows
        (8, 5000, 1, 1),  # a row over the budget goes alone
    ],
)
def test_rows_per_pass_fits_the_token_budget(
    batch_size: int, longest: int, sequences: int, expected: int
) -> None:
    config = TrainConfig(batch_size=batch_size, micro_batch_tokens=2048, max_length=4096)
    assert rows_per_pass(config, longest, sequences) == expected


def test_rows_per_pass_counts_rows_truncated_to_max_length() -> None:
    config = TrainConfig(batch_size=8, micro_batch_tokens=2048, max_length=256)
    assert rows_per_pass(config, 5000) == 8


# Completions of different lengths: averaging each micro-batch's loss and then the passes
# (instead of dividing by the whole step's completion tokens) would weight rows unequally, and
# the gradients below would differ by tens of percent, not by rounding.
MIXED_ROWS = [
    SFTRow(answer_messages(k), ["blue", "blue i think", "it is blue , i think so"][i % 3])
    for i, k in enumerate(TRAIN_KEYS[:8])
]
# Float32, unit roundoff u = 2**-24 = 6e-8. Both gradients are sums of the same per-token
# terms, grouped differently (8 rows in one pass vs 8 passes of one row: other matrix shapes,
# other kernel blocking, another order of the accumulation). A sum of n same-signed terms moves
# by at most ~n*u of itself; the ~300 completion and padding positions of a step give ~2e-5 of
# a tensor's scale, and GRAD_RTOL leaves 5x above that. Measured: 6.6e-7 with AVX-512 kernels,
# 6.1e-7 with AVX2 forced. A normalisation error would weight these rows of 2 to 9
# completion tokens alike instead of by their tokens: tens of percent apart.
GRAD_RTOL = 1e-4


def _first_step(tiny_model_dir: Path, config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """The LoRA gradients of the first optimizer step as ``train_adapter`` builds its SFT
    trainer (after the step's micro-batches are accumulated and clipped, before AdamW moves
    anything), the first logged loss, and the rows per pass."""
    from transformers import TrainerCallback

    from cotune.training.base_model import _load_base, _load_tokenizer, _lora_config
    from cotune.training.trainers import _sft_trainer

    seen: dict[str, Any] = {"grads": {}, "losses": []}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            if not seen["grads"]:
                seen["grads"] = {
                    name: p.grad.detach().clone()
                    for name, p in model.named_parameters()
                    if p.grad is not None
                }

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                seen["losses"].append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            control.should_training_stop = True

    trainer = _sft_trainer(
        _load_base(tiny_model_dir, config, gpu=False),
        _load_tokenizer(tiny_model_dir),
        MIXED_ROWS,
        config,
        run_dir,
        seed=0,
        gpu=False,
        peft_config=_lora_config(config),
        callbacks=[Capture()],
    )
    trainer.train()
    seen["per_pass"] = trainer.args.per_device_train_batch_size
    seen["accumulation"] = trainer.args.gradient_accumulation_steps
    return seen


def test_micro_batches_accumulate_the_whole_batch_gradient(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What micro-batching claims: one row per pass, accumulated, gives the gradient the whole
    batch gives in one pass (and the same loss), before any optimizer step. Later steps are
    not compared weight by weight: AdamW divides by the root of the second moment, so a
    near-zero gradient whose sign is rounding noise legitimately moves a weight by ~lr."""
    import torch

    config = CONFIG.model_copy(update={"batch_size": 8, "epochs": 1})
    whole = _first_step(tiny_model_dir, config, tmp_path / "whole")
    micro = _first_step(
        tiny_model_dir, config.model_copy(update={"micro_batch_tokens": 32}), tmp_path / "micro"
    )
    assert (whole["per_pass"], whole["accumulation"]) == (8, 1)
    assert (micro["per_pass"], micro["accumulation"]) == (1, 8)
    assert micro["losses"][0] == pytest.approx(whole["losses"][0], rel=1e-5)
    assert sorted(micro["grads"]) == sorted(whole["grads"])
    lora_b = [name for name in whole["grads"] if "lora_B" in name]
    assert lora_b and all(float(whole["grads"][n].abs().max()) > 0 for n in lora_b)
    for name, expected in whole["grads"].items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(
            micro["grads"][name], expected, atol=GRAD_RTOL * scale, rtol=0, msg=name
        )


def test_train_adapter_splits_a_step_into_micro_batches(
    sft_adapter: TrainResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The whole run with one row per pass: the same number of optimizer steps (each still
    sees ``batch_size`` rows), the same first loss, and a learned adapter."""
    messages: list[str] = []
    config = CONFIG.model_copy(update={"micro_batch_tokens": 32})
    result = train_adapter(
        tiny_model_dir, ROWS, [], config, tmp_path / "adapter", seed=0, progress=messages.append
    )
    assert any("1 row(s) per pass" in m for m in messages), messages
    assert result.sft_steps == sft_adapter.sft_steps
    assert result.sft_losses[0] == pytest.approx(sft_adapter.sft_losses[0], rel=1e-5)
    assert result.sft_losses[-1] < result.sft_losses[0]
