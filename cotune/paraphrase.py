"""Paraphrased task inputs for augmentation (``loop.paraphrases``, docs/algorithm.md).

The judge rewrites the text inputs of each train example in other words; the example keeps its
gold. A rewrite is kept only where a stated rule finds nothing the answer could rest on lost or
added, and no gold answer shown that the original did not show:

- every text field came back non-empty, and at least one differs from the original;
- each field states the same numbers as the original, as many times each, by value (digits
  and the number words zero to twenty: "3 drums" may become "three drums", "two flutes" may
  not become "three flutes");
- each field still holds at least half (``KEEP_WORDS``) of the original's distinct words of
  three or more letters: a paraphrase rewords, it keeps the names and things (a reply about
  something else, as a small judge may write, is dropped);
- the rewritten fields show no gold value the original fields did not: where every token of
  a gold value (SQuAD normalisation) occurs in the rewrite, it occurred in the original too,
  the rule by which the final writer's hindsight target is admitted. The judge never sees the
  gold (its prompt is the inputs alone), so this is a check against chance, kept so that no
  training prompt shows an answer the task's own input hides.

What a rule cannot see (a colour or a name swapped) is left to the loop: a paraphrased
example's traces become rows only as any rollout's do, when they pass or by a correction that
replay verified against the example's gold.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cotune.data import Example
from cotune.engines.base import GenerationRequest, GenerationResult, InferenceEngine
from cotune.judge.batch import generate_or_error
from cotune.judge.parse import JudgeParseError, extract_json
from cotune.metrics import NUMBER_WORDS, normalize
from cotune.spec import SystemSpec

MARK = "~p"  # a paraphrase's id: "<train id>~p<k>"
KEEP_WORDS = 0.5  # the least share of the original's words a kept rewrite still holds
_WORD = re.compile(r"[a-z0-9]+")

SYSTEM_PROMPT = (
    "You rewrite the inputs of a task in other words, to make more training data. Keep every "
    "fact, name, colour, number and quantity exactly as given; change only the wording. Do not "
    "answer the task and do not add anything. Reply with one JSON object holding each field, "
    "rewritten."
)


@dataclass
class Paraphrased:
    """One stage's paraphrases: the kept examples, why the others were dropped, the calls."""

    examples: list[Example] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    calls: int = 0


def text_fields(system: SystemSpec, example: Example) -> list[str]:
    """The inputs a paraphrase rewrites: the system's inputs that hold non-empty text."""
    return [
        name
        for name in system.inputs
        if isinstance(example.inputs.get(name), str) and example.inputs[name].strip()
    ]


def paraphrase_request(
    system: SystemSpec,
    example: Example,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    schema: bool,
) -> GenerationRequest:
    """The judge's request for one rewrite of ``example``'s text inputs (never its gold)."""
    names = text_fields(system, example)
    shown = "\n".join(f"{name}: {example.inputs[name]}" for name in names)
    task = f"Task: {system.name}" + (f" ({system.description})" if system.description else "")
    json_schema = None
    if schema:
        json_schema = {
            "type": "object",
            "properties": {
                name: {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 2 * len(example.inputs[name]) + 40,
                }
                for name in names
            },
            "required": names,
            "additionalProperties": False,
        }
    return GenerationRequest(
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{task}\nFields:\n{shown}\nReturn the JSON object now."},
        ],
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        json_schema=json_schema,
    )


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _numbers(text: str) -> Counter[int]:
    """The numbers ``text`` states, by value ("three" and "3" are one number)."""
    return Counter(
        int(w[-18:]) if w.isdigit() else NUMBER_WORDS[w]
        for w in _words(text)
        if w.isdigit() or w in NUMBER_WORDS
    )


def _kept_share(original: str, rewrite: str) -> float:
    """The share of the original's distinct words of 3+ letters or digits (SQuAD
    normalisation) that the rewrite still holds: names and things are rarely reworded."""
    words = {w for w in normalize(original).split() if len(w) >= 3 or w.isdigit()}
    if not words:
        return 1.0
    return len(words & set(normalize(rewrite).split())) / len(words)


def _admits(text: str, gold: str) -> bool:
    """Whether ``text`` shows each token of ``gold`` (SQuAD normalisation): the rule by which
    ``cotune.verify.hindsight_target`` would take gold as the final writer's target."""
    tokens = normalize(gold).split()
    return bool(tokens) and set(normalize(text).split()).issuperset(tokens)


def drop_reason(system: SystemSpec, example: Example, inputs: dict[str, Any]) -> str | None:
    """Why a rewrite of ``example``'s inputs is not kept (module docstring), or None."""
    names = text_fields(system, example)
    if any(not isinstance(inputs.get(n), str) or not inputs[n].strip() for n in names):
        return "a field came back empty"
    if all(" ".join(inputs[n].split()) == " ".join(example.inputs[n].split()) for n in names):
        return "unchanged"
    if any(_numbers(inputs[n]) != _numbers(example.inputs[n]) for n in names):
        return "its numbers changed"
    if any(_kept_share(example.inputs[n], inputs[n]) < KEEP_WORDS for n in names):
        return "it keeps too few of the original's words"
    before = " ".join(example.inputs[n] for n in names)
    after = " ".join(inputs[n] for n in names)
    if any(_admits(after, g) and not _admits(before, g) for g in example.expected or []):
        return "it shows a gold answer the original does not"
    return None


def paraphrased(
    system: SystemSpec,
    requests: Sequence[tuple[Example, int]],
    results: Sequence[GenerationResult],
) -> Paraphrased:
    """The kept rewrites as examples (id ``<id>~p<k>``, the original's gold, no targets)."""
    out = Paraphrased(calls=len(results))
    for (example, k), result in zip(requests, results, strict=True):
        try:
            reply = extract_json(result.text)
        except JudgeParseError:
            cut = result.finish_reason == "length"
            out.dropped["cut at max_tokens" if cut else "unreadable"] += 1
            continue
        reason = drop_reason(system, example, reply)
        if reason is not None:
            out.dropped[reason] += 1
            continue
        inputs = dict(example.inputs)
        inputs.update({name: reply[name] for name in text_fields(system, example)})
        out.examples.append(
            Example(id=f"{example.id}{MARK}{k}", inputs=inputs, expected=example.expected)
        )
    return out


def paraphrase_examples(
    engine: InferenceEngine,
    system: SystemSpec,
    examples: Sequence[Example],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    max_calls: int | None = None,
) -> Paraphrased:
    """``n`` rewrites of each example with text inputs, by ``engine`` (the judge) in one batch,
    at most ``max_calls`` requests (the judge budget); the kept ones as examples."""
    schema = bool(engine.supports_json_schema())
    wanted = [(e, k) for e in examples if text_fields(system, e) for k in range(n)]
    if max_calls is not None:
        wanted = wanted[: max(max_calls, 0)]
    if not wanted:
        return Paraphrased()
    requests = [
        paraphrase_request(
            system,
            example,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed + k,
            schema=schema,
        )
        for example, k in wanted
    ]
    results, error = generate_or_error(engine, requests)
    if error is not None:  # a judge endpoint down: no paraphrases, the stage goes on
        return Paraphrased(dropped=Counter({error: len(requests)}), calls=len(requests))
    return paraphrased(system, wanted, results)
