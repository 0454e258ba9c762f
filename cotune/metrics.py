"""Task metrics: score a system's final output against the accepted gold values.

Every metric is a function ``(prediction: str, gold: str) -> float`` in [0, 1]. ``score`` turns
the prediction into text, calls the metric once per accepted gold value and keeps the best.
Normalisation follows SQuAD: lowercase, drop punctuation and the articles a/an/the, squash
whitespace.

A binary metric may have a *graded companion* (``companion_score``): a score in [0, 1] that
is 1 whenever the metric is, and otherwise says how close the prediction came. Verification may
use it (``loop.graded_verification``) to accept a correction that moves an output closer to
gold without making it right; final scores are always the task metric.

``judge`` is a placeholder name: the system is scored by the LLM judge under its ``rubric``
(``cotune.scoring.JudgeScorer``), not against gold, so it needs no ``expected`` and ``score``
refuses it.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any, overload

from cotune.errors import CotuneError

MetricFn = Callable[[str, str], float]

JUDGE = "judge"
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")

_METRICS: dict[str, MetricFn] = {}
_COMPANIONS: dict[str, MetricFn] = {}


class MetricError(CotuneError, ValueError):
    """A metric is unknown, misused, or returned something that is not a score."""


# -- registry ---------------------------------------------------------------------------------


@overload
def register_metric(name: str, fn: None = None) -> Callable[[MetricFn], MetricFn]: ...
@overload
def register_metric(name: str, fn: MetricFn) -> MetricFn: ...
def register_metric(
    name: str, fn: MetricFn | None = None
) -> MetricFn | Callable[[MetricFn], MetricFn]:
    """Register ``fn(prediction, gold) -> float`` under ``name``.

    Use as ``register_metric("name", fn)`` or as the decorator ``@register_metric("name")``.
    Registering a different function under a taken name is refused.
    """

    def add(metric: MetricFn) -> MetricFn:
        existing = _METRICS.get(name)
        if existing is not None and existing is not metric:
            raise MetricError(f"metric {name!r} is already registered")
        _METRICS[name] = metric
        return metric

    return add if fn is None else add(fn)


def known_metrics() -> set[str]:
    return set(_METRICS)


def metric_needs_gold(name: str) -> bool:
    """Whether examples scored by ``name`` need an ``expected`` value (all but ``judge``)."""
    _lookup(name)
    return name != JUDGE


def score(metric_name: str, prediction: Any, gold: str | list[str] | None) -> float:
    """Score ``prediction`` against the accepted gold value(s): the best score over them."""
    metric = _lookup(metric_name)
    if metric_name == JUDGE:
        raise MetricError(
            f"metric {JUDGE!r} has no gold comparison: the judge scores it (cotune.scoring)"
        )
    golds = [gold] if isinstance(gold, str) else gold
    if not golds or not all(isinstance(g, str) for g in golds):
        raise MetricError(
            f"metric {metric_name!r} needs the gold value as a string or a non-empty list of "
            f"strings, got {gold!r}"
        )
    text = as_text(prediction)
    best = 0.0
    for accepted in golds:
        value = metric(text, accepted)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise MetricError(f"metric {metric_name!r} returned {value!r}, not a number in [0, 1]")
        best = max(best, float(value))
    return best


def has_companion(metric_name: str) -> bool:
    return metric_name in _COMPANIONS


def companion_score(metric_name: str, prediction: Any, gold: str | list[str]) -> float:
    """The graded companion of ``metric_name`` against the accepted gold value(s), the best
    over them; refused for a metric without one (``has_companion``)."""
    if metric_name not in _COMPANIONS:
        raise MetricError(f"metric {metric_name!r} has no graded companion")
    golds = [gold] if isinstance(gold, str) else gold
    text = as_text(prediction)
    return max(_COMPANIONS[metric_name](text, accepted) for accepted in golds)


def _lookup(name: str) -> MetricFn:
    try:
        return _METRICS[name]
    except KeyError:
        raise MetricError(f"unknown metric {name!r}; known: {sorted(_METRICS)}") from None


# -- text helpers -----------------------------------------------------------------------------


def as_text(value: Any) -> str:
    """A prediction as text: strings as they are, lists and dicts as JSON, None as ''."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def shows_tokens(text: str, value: str) -> bool:
    """Whether every token of ``value`` occurs among ``text``'s (both normalised); a value
    without tokens is never shown. The rule that admits a gold answer as the final writer's
    hindsight target (``cotune.verify``) and keeps paraphrases from showing an unseen one."""
    tokens = normalize(value).split()
    return bool(tokens) and set(normalize(text).split()).issuperset(tokens)


def split_items(text: str) -> list[str]:
    """A list given as a JSON list, as lines, or (on one line) as comma-separated items."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(stripped)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, list):
            return [as_text(item) for item in loaded]
    lines = [line for line in stripped.splitlines() if line.strip()]
    parts = lines if len(lines) > 1 else stripped.split(",")
    return [_BULLET.sub("", part) for part in parts]


# -- built-in metrics -------------------------------------------------------------------------


@register_metric("exact_match")
def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


@register_metric("f1")
def f1(prediction: str, gold: str) -> float:
    """Token F1 between the normalised texts (SQuAD)."""
    pred_tokens, gold_tokens = normalize(prediction).split(), normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@register_metric("contains")
def contains(prediction: str, gold: str) -> float:
    """The normalised gold occurs in the normalised prediction, on whole-token boundaries
    ("417" is in "the code is 417" but not in "4170")."""
    return float(f" {normalize(gold)} " in f" {normalize(prediction)} ")


@register_metric("list_equal")
def list_equal(prediction: str, gold: str) -> float:
    """Both sides are lists of items, equal as multisets after normalisation (order free)."""

    def items(text: str) -> Counter[str]:
        return Counter(n for n in map(normalize, split_items(text)) if n)

    return float(items(prediction) == items(gold))


@register_metric(JUDGE)
def judge(prediction: str, gold: str) -> float:  # pragma: no cover - score() refuses it first
    raise MetricError(f"metric {JUDGE!r}: the judge scores it")


# -- graded companions of the binary metrics (docs/algorithm.md has the table) -----------------


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().rstrip(".").replace(",", ""))
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def number_closeness(prediction: str, gold: str) -> float | None:
    """1 - |p - g| / max(|p|, |g|), floored at 0, when both sides are one number; else None.
    1 only when equal; 7 is closer to 9 than 3 is."""
    p, g = _number(prediction), _number(gold)
    if p is None or g is None:
        return None
    scale = max(abs(p), abs(g))
    return 1.0 if scale == 0 else max(0.0, 1 - abs(p - g) / scale)


def exact_match_companion(prediction: str, gold: str) -> float:
    """1 on an exact match; else a number's closeness where both sides are numbers, else
    token F1 (which is also 1 for the right words in another order)."""
    if exact_match(prediction, gold):
        return 1.0
    closeness = number_closeness(prediction, gold)
    return f1(prediction, gold) if closeness is None else closeness


def contains_companion(prediction: str, gold: str) -> float:
    """The share of gold tokens the prediction has (recall): extra words never cost under
    ``contains``, so they do not here either. 1 whenever ``contains`` is."""
    gold_tokens = normalize(gold).split()
    if not gold_tokens:
        return 1.0
    same = sum((Counter(normalize(prediction).split()) & Counter(gold_tokens)).values())
    return same / len(gold_tokens)


def list_equal_companion(prediction: str, gold: str) -> float:
    """Items right over the longer list's length, as multisets like ``list_equal`` (order
    free): 2 of 3 gold items and nothing else is 2/3; an extra wrong item costs as a missing one."""

    def items(text: str) -> Counter[str]:
        return Counter(n for n in map(normalize, split_items(text)) if n)

    predicted, wanted = items(prediction), items(gold)
    longer = max(sum(predicted.values()), sum(wanted.values()))
    return 1.0 if longer == 0 else sum((predicted & wanted).values()) / longer


_COMPANIONS.update(
    exact_match=exact_match_companion,
    contains=contains_companion,
    list_equal=list_equal_companion,
)
