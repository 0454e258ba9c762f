"""Paraphrased task inputs for augmentation (``loop.paraphrases``, docs/algorithm.md).

The judge rewrites the text inputs of each train example in other words; the example keeps its
gold. A rewrite is kept only where a stated rule finds nothing the answer could rest on lost or
added, and no gold answer shown that the original did not show:

- every text field came back non-empty, and at least one differs from the original in more
  than case, punctuation and spacing;
- each field states the same numbers as the original, as many times each, by value (every
  run of digits, inside a word too, and the number words: "3 drums" may become "three drums",
  "3rd" "third"; "two flutes" may not become "three flutes", nor "5kg" "7kg");
- each field still holds at least half (``KEEP_WORDS``) of the original's distinct words of
  three or more letters: a paraphrase rewords, it keeps the names and things (a reply about
  something else, as a small judge may write, is dropped);
- the rewritten fields show no gold value the original fields did not: where every token of
  a gold value (SQuAD normalisation) occurs in the rewrite, it occurred in the original too,
  the rule by which the final writer's hindsight target is admitted. The judge never sees the
  gold (its prompt is the inputs alone), so this is a check against chance, kept so that no
  training prompt shows an answer the task's own input hides.

Not asked for: an example whose text is longer than ``LONG`` x the judge's ``max_tokens``
characters (its rewrite would be cut), and what the judge budget leaves out. Dropped too: a
rewrite equal to a kept one of the same example, or one whose id another example has.

What a rule cannot see (a colour or a name swapped) is left to the loop: a paraphrased
example's traces become rows only as any rollout's do, when they pass or by a correction that
replay verified against the example's gold.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from cotune.data import Example
from cotune.engines.base import GenerationRequest, GenerationResult, InferenceEngine
from cotune.judge.batch import generate_or_error
from cotune.judge.parse import JudgeParseError, extract_json
from cotune.metrics import normalize, shows_tokens
from cotune.spec import SystemSpec
from cotune.tools.registry import NUMBER_WORDS

MARK = "~p"  # a paraphrase's id: "<train id>~p<k>"
KEEP_WORDS = 0.5  # the least share of the original's words a kept rewrite still holds
_DIGITS = re.compile(r"\d+")
_LETTERS = re.compile(r"[a-z]+")
# number words by value: zero to twenty (the count tool's), the tens, scales and ordinals
_TENS = "thirty forty fifty sixty seventy eighty ninety"
_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"
_VALUES: dict[str, int] = {
    **NUMBER_WORDS,
    **{word: 10 * (i + 3) for i, word in enumerate(_TENS.split())},
    **{word: i + 1 for i, word in enumerate(_ORDINALS.split())},
    "hundred": 100,
    "thousand": 1000,
    "million": 10**6,
    "billion": 10**9,
}
LONG = 3  # a text longer than LONG x the judge's max_tokens, in characters, is not asked for

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


def _numbers(text: str) -> Counter[int]:
    """The numbers ``text`` states, by value: every run of digits, inside a word too ("5kg",
    "3rd"), and the number words ("three" and "3" are one number, "third" too)."""
    digits = Counter(int(d[-18:]) for d in _DIGITS.findall(text))
    words = Counter(_VALUES[w] for w in _LETTERS.findall(text.lower()) if w in _VALUES)
    return digits + words


def _kept_share(original: str, rewrite: str) -> float:
    """The share of the original's distinct words of 3+ letters or digits (SQuAD
    normalisation) that the rewrite still holds: names and things are rarely reworded."""
    words = {w for w in normalize(original).split() if len(w) >= 3 or w.isdigit()}
    if not words:
        return 1.0
    return len(words & set(normalize(rewrite).split())) / len(words)


def drop_reason(system: SystemSpec, example: Example, inputs: dict[str, Any]) -> str | None:
    """Why a rewrite of ``example``'s inputs is not kept (module docstring), or None."""
    names = text_fields(system, example)
    if any(not isinstance(inputs.get(n), str) or not inputs[n].strip() for n in names):
        return "a field came back empty"
    if all(normalize(inputs[n]) == normalize(example.inputs[n]) for n in names):
        return "unchanged"  # case, punctuation and spacing aside: "...2030?," is a copy
    if any(_numbers(inputs[n]) != _numbers(example.inputs[n]) for n in names):
        return "its numbers changed"
    if any(_kept_share(example.inputs[n], inputs[n]) < KEEP_WORDS for n in names):
        return "it keeps too few of the original's words"
    before = " ".join(example.inputs[n] for n in names)
    after = " ".join(inputs[n] for n in names)
    if any(shows_tokens(after, g) and not shows_tokens(before, g) for g in example.expected or []):
        return "it shows a gold answer the original does not"
    return None


def paraphrased(
    system: SystemSpec,
    requests: Sequence[tuple[Example, int]],
    results: Sequence[GenerationResult],
    taken: Set[str] = frozenset(),
) -> Paraphrased:
    """The kept rewrites as examples (id ``<id>~p<k>``, the original's gold, no targets); an id
    in ``taken`` (another example's) or a rewrite equal to a kept one of the same example is
    dropped too."""
    out = Paraphrased(calls=len(results))
    seen: set[tuple[str, str]] = set()
    for (example, k), result in zip(requests, results, strict=True):
        try:
            reply = extract_json(result.text)
        except JudgeParseError:
            cut = result.finish_reason == "length"
            out.dropped["cut at max_tokens" if cut else "unreadable"] += 1
            continue
        reason = drop_reason(system, example, reply)
        names = text_fields(system, example)
        same = (example.id, json.dumps([normalize(reply[n]) for n in names]))
        example_id = f"{example.id}{MARK}{k}"
        if reason is None and example_id in taken:
            reason = "its id is another example's"
        if reason is None and same in seen:
            reason = "a duplicate"
        if reason is not None:
            out.dropped[reason] += 1
            continue
        seen.add(same)
        inputs = dict(example.inputs)
        inputs.update({name: reply[name] for name in names})
        out.examples.append(Example(id=example_id, inputs=inputs, expected=example.expected))
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
    taken: Set[str] = frozenset(),
) -> Paraphrased:
    """``n`` rewrites of each example with text inputs, by ``engine`` (the judge) in one batch,
    at most ``max_calls`` requests (the judge budget); the kept ones as examples. An example
    whose text is longer than ``LONG`` x ``max_tokens`` characters is not asked for (its rewrite
    would be cut); what the budget leaves out is not asked for either. Both are counted in
    ``dropped``, so kept + dropped is every rewrite wanted."""
    out = Paraphrased()
    wanted: list[tuple[Example, int]] = []
    for example in examples:
        names = text_fields(system, example)
        if not names:
            continue
        if sum(len(example.inputs[name]) for name in names) > LONG * max_tokens:
            out.dropped["not asked: longer than max_tokens can rewrite"] += n
            continue
        wanted.extend((example, k) for k in range(n))
    if max_calls is not None and len(wanted) > max(max_calls, 0):
        out.dropped["not asked: over the judge budget"] += len(wanted) - max(max_calls, 0)
        wanted = wanted[: max(max_calls, 0)]
    if not wanted:
        return out
    schema = bool(engine.supports_json_schema())
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
        out.dropped[error] += len(requests)
        out.calls = len(requests)
        return out
    got = paraphrased(system, wanted, results, taken)
    got.dropped.update(out.dropped)
    return got
