import pytest

from cotune import metrics
from cotune.metrics import (
    MetricError,
    companion_score,
    has_companion,
    known_metrics,
    metric_needs_gold,
    normalize,
    register_metric,
    score,
)


def test_normalize_is_squad_style() -> None:
    assert normalize("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize("an apple a day") == "apple day"
    assert normalize("theatre") == "theatre"  # articles only as whole words


def test_builtins_are_known() -> None:
    assert {"exact_match", "f1", "contains", "list_equal", "judge"} <= known_metrics()


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("The answer is 417.", "the answer is 417", 1.0),
        ("417", "418", 0.0),
        ("Paris", ["London", "paris"], 1.0),  # max over accepted golds
        ("", "", 1.0),
    ],
)
def test_exact_match(prediction: str, gold: str | list[str], expected: float) -> None:
    assert score("exact_match", prediction, gold) == expected


def test_f1_is_token_overlap() -> None:
    # pred tokens: [quick, brown, fox]; gold: [brown, fox, jumps, high] -> p=2/3, r=1/2
    assert score("f1", "the quick brown fox", "brown fox jumps high") == pytest.approx(4 / 7)
    assert score("f1", "cat", "dog") == 0.0
    assert score("f1", "a", "the") == 1.0  # both empty after normalisation
    assert score("f1", "brown", ["dog", "brown fox"]) == pytest.approx(2 / 3)


def test_contains_matches_whole_tokens() -> None:
    assert score("contains", "I think the code is 417.", "417") == 1.0
    assert score("contains", "The Eiffel Tower, Paris", "eiffel tower") == 1.0
    assert score("contains", "the code is 4170", "417") == 0.0
    assert score("contains", "nothing here", ["x", "here"]) == 1.0


@pytest.mark.parametrize(
    "prediction",
    [
        '["Oslo", "bergen"]',
        "bergen\nOslo",
        "Oslo, Bergen",
        "1. Bergen\n2. Oslo",
        "- oslo\n- bergen",
    ],
)
def test_list_equal_accepts_any_list_format(prediction: str) -> None:
    assert score("list_equal", prediction, '["oslo", "Bergen"]') == 1.0
    assert score("list_equal", prediction, "oslo, bergen") == 1.0


def test_list_equal_compares_multisets() -> None:
    assert score("list_equal", "a1, b2", "a1, b2, b2") == 0.0
    assert score("list_equal", "oslo", "oslo, bergen") == 0.0
    assert score("list_equal", ["oslo", "bergen"], "bergen\noslo") == 1.0  # list prediction


def test_non_string_prediction_becomes_text() -> None:
    assert score("exact_match", 417, "417") == 1.0
    assert score("exact_match", None, "") == 1.0


def test_judge_needs_no_gold_and_cannot_be_scored() -> None:
    assert metric_needs_gold("judge") is False
    assert metric_needs_gold("exact_match") is True
    with pytest.raises(MetricError, match="judge scores it"):
        score("judge", "anything", None)


def test_unknown_metric_is_named() -> None:
    with pytest.raises(MetricError, match="unknown metric 'bleu'"):
        score("bleu", "a", "a")
    with pytest.raises(MetricError, match="'bleu'"):
        metric_needs_gold("bleu")


@pytest.mark.parametrize("gold", [None, [], [1]])
def test_bad_gold_is_refused_naming_the_metric(gold: object) -> None:
    with pytest.raises(MetricError, match="metric 'f1' needs the gold value"):
        score("f1", "x", gold)  # type: ignore[arg-type]


@pytest.fixture
def scratch_metric():
    names = []

    def register(name, fn=None):
        names.append(name)
        return register_metric(name, fn)

    yield register
    for name in names:
        metrics._METRICS.pop(name, None)


def test_register_metric_as_decorator_and_call(scratch_metric) -> None:
    @scratch_metric("length_match")
    def length_match(prediction: str, gold: str) -> float:
        return float(len(prediction) == len(gold))

    scratch_metric("always_half", lambda p, g: 0.5)
    assert {"length_match", "always_half"} <= known_metrics()
    assert score("length_match", "abc", ["x", "xyz"]) == 1.0
    assert score("always_half", "a", "b") == 0.5
    assert metric_needs_gold("length_match") is True


def test_register_metric_refuses_a_taken_name(scratch_metric) -> None:
    with pytest.raises(MetricError, match="'exact_match' is already registered"):
        register_metric("exact_match", lambda p, g: 1.0)
    assert score("exact_match", "a", "b") == 0.0  # the built-in is untouched


def test_out_of_range_metric_is_refused(scratch_metric) -> None:
    scratch_metric("broken", lambda p, g: 2.0)
    with pytest.raises(MetricError, match=r"metric 'broken' returned 2\.0"):
        score("broken", "a", "a")


# -- graded companions (graded verification) ----------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "prediction", "gold", "expected"),
    [
        # exact_match: 1 on a match, a number's closeness where both are numbers, else token F1
        ("exact_match", "The Eiffel Tower", "eiffel tower", 1.0),
        ("exact_match", "tower eiffel", "eiffel tower", 1.0),  # right words, wrong order
        ("exact_match", "red one", "red", 2 / 3),
        ("exact_match", "blue", "red", 0.0),
        ("exact_match", "7", "9", 1 - 2 / 9),
        ("exact_match", "3", "9", 1 - 6 / 9),
        ("exact_match", "1,000", "1000", 1.0),
        ("exact_match", "-4", "5", 0.0),  # farther than the gold is from 0
        ("exact_match", "0", "0.0", 1.0),
        ("exact_match", "seven", "9", 0.0),  # one side is no number: token F1
        # contains: the share of gold tokens present; extra words cost nothing
        ("contains", "the code is 417, I think", "417", 1.0),
        ("contains", "it is in new york state", "New York City", 2 / 3),
        ("contains", "nothing here", "417", 0.0),
        # list_equal: items right over the longer list, order free
        ("list_equal", "a, b, c", "c, a, b", 1.0),
        ("list_equal", '["apple", "pear", "fig"]', "apple, kiwi, plum", 1 / 3),
        ("list_equal", "apple, pear, plum", "apple, kiwi, plum", 2 / 3),
        ("list_equal", "apple, pear", "apple, pear, plum", 2 / 3),  # one missing
        ("list_equal", "apple, pear, plum, fig", "apple, pear, plum", 3 / 4),  # one extra
        ("list_equal", "apple, apple", "apple, pear", 1 / 2),  # a multiset, like the metric
    ],
)
def test_graded_companion(metric: str, prediction: str, gold: str, expected: float) -> None:
    assert companion_score(metric, prediction, gold) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["exact_match", "contains", "list_equal"])
@pytest.mark.parametrize(
    ("prediction", "gold"),
    [("apple, pear", "pear, apple"), ("Paris", "paris"), ("12", "12"), ("x", "y"), ("", "a")],
)
def test_a_companion_is_1_whenever_its_metric_is(metric: str, prediction: str, gold: str) -> None:
    graded = companion_score(metric, prediction, gold)
    assert 0.0 <= graded <= 1.0
    if score(metric, prediction, gold) == 1.0:
        assert graded == 1.0


def test_the_companion_takes_the_best_gold_and_only_binary_metrics_have_one() -> None:
    assert companion_score("list_equal", "x, y", ["x, z", "x, y, z"]) == pytest.approx(2 / 3)
    assert {m for m in known_metrics() if has_companion(m)} == {
        "exact_match",
        "contains",
        "list_equal",
    }
    with pytest.raises(MetricError, match="'f1' has no graded companion"):
        companion_score("f1", "a", "a")
