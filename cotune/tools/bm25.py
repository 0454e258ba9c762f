"""BM25 retrieval over a corpus of ``{id, text, title?}`` rows, with ``bm25s``.

Passages render as ``"title: text"`` (or ``text``); that rendering is what is indexed and
returned. Ranking is by score, ties broken by corpus order, and only passages sharing a term
with the query are returned, so a query with no known term gets ``[]``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cotune.errors import DataError

STOPWORDS = "en"


def render_passage(row: Mapping[str, Any]) -> str:
    title = row.get("title")
    return f"{title}: {row['text']}" if title else str(row["text"])


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    tokens = bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)
    return [list(t) for t in tokens]


class BM25Index:
    def __init__(self, passages: list[str], ids: list[str]) -> None:
        import bm25s

        if not passages:
            raise ValueError("a BM25 index needs at least one passage")
        self.passages = passages
        self.ids = ids
        self._retriever = bm25s.BM25()
        self._retriever.index(_tokenize(passages), show_progress=False)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> BM25Index:
        rows = list(rows)
        return cls([render_passage(r) for r in rows], [str(r["id"]) for r in rows])

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int) -> list[str]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int) -> list[list[str]]:
        return [[self.passages[i] for i in self._top(tokens, k)] for tokens in _tokenize(queries)]

    def _top(self, tokens: list[str], k: int) -> list[int]:
        ids = self._retriever.get_tokens_ids([t for t in tokens if t])
        if not ids or k <= 0:
            return []
        scores = np.asarray(self._retriever.get_scores_from_ids(ids), dtype=np.float64)
        order = np.lexsort((np.arange(len(scores)), -scores))  # score desc, then corpus order
        return [int(i) for i in order[:k] if scores[i] > 0]


_CACHE: dict[str, tuple[tuple[int, int], BM25Index]] = {}
_LOCK = threading.Lock()


def get_index(path: str | Path) -> BM25Index:
    """The index of a JSONL corpus file, built once per file version (path, mtime, size)."""
    from cotune.data import load_corpus

    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as err:
        raise DataError(f"cannot open corpus: {err.strerror}", path=str(path)) from None
    version = (stat.st_mtime_ns, stat.st_size)
    key = str(resolved)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        index = BM25Index.from_rows(load_corpus(resolved))
        _CACHE[key] = (version, index)
        return index


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
