"""The training buffer (``cotune.synthesis.Buffer``): rows per component, deduplicated, and
``only``, which lets augmentation fill what a component lacks and nothing more."""

from __future__ import annotations

from cotune.synthesis import Buffer
from cotune.training import DPOPair, SFTRow


def row(text: str) -> SFTRow:
    return SFTRow([{"role": "user", "content": text}], "out " + text, "augment")


def pair(text: str) -> DPOPair:
    return DPOPair([{"role": "user", "content": text}], "good " + text, "bad " + text)


def test_only_gives_new_rows_to_the_named_components_up_to_their_room() -> None:
    buffer = Buffer()
    assert buffer.add_sft("answer", row("a"))
    with buffer.only({"query": 2, "answer": 1}):
        assert not buffer.add_sft("answer", row("a"))  # a duplicate takes no room ...
        assert buffer.add_sft("answer", row("b"))  # ... so the one place is still free
        assert not buffer.add_sft("answer", row("c"))
        assert [buffer.add_sft("query", row(t)) for t in "xyz"] == [True, True, False]
        assert not buffer.add_sft("other", row("x"))  # not named: no room
        assert buffer.add_pair("answer", pair("b"))  # pairs have room of their own
        assert not buffer.add_pair("answer", pair("c"))
    assert buffer.add_sft("answer", row("c")) and buffer.add_sft("other", row("x"))
    counts = {name: (c.samples, c.pairs) for name, c in buffer.counts().items()}
    assert counts == {"answer": (3, 1), "query": (2, 0), "other": (1, 0)}
