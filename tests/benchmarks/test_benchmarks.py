"""The quality benchmark's scripts, so they don't rot: the data builder on small fabricated
SQuAD- and BIG-bench-shaped files (no network), the paired statistics, the counting tool, and
``benchmarks/quality.py`` end to end on the tiny model (real vLLM, real TRL)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import data as bench_data
    import quality
    import speed_judge
finally:
    sys.path.pop(0)

SIZES = {"train": 4, "val": 3, "test": 5}


def fake_squad(articles: int = 3, paragraphs: int = 5) -> dict[str, Any]:
    """SQuAD v1.1's shape: data -> articles -> paragraphs (context, qas -> answers)."""
    data: list[dict[str, Any]] = []
    for a in range(articles):
        rows = []
        for p in range(paragraphs):
            qas = [
                {
                    "id": f"q{a}-{p}-{q}",
                    "question": f"What  is fact {q} of paragraph {p}\nin article {a}?",
                    "answers": [
                        {"answer_start": 0, "text": f"answer {a}-{p}-{q}"},
                        {"answer_start": 0, "text": f"answer {a}-{p}-{q} "},  # same, spaced
                        {"answer_start": 0, "text": f"the answer {a}-{p}-{q}"},
                    ],
                }
                for q in range(2)
            ]
            rows.append({"context": f"Paragraph {p} of article {a}.", "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": rows})
    # One paragraph whose only question has no answer: it stays in the corpus, asks nothing.
    data[0]["paragraphs"].append({"context": "No answers here.", "qas": []})
    return {"version": "1.1", "data": data}


def fake_object_counting() -> dict[str, Any]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    examples: list[dict[str, Any]] = [
        {
            "input": f"I have {i} things, item {i}. How many fruits do I have?",
            "target": [words[i % 8], str(i % 8 + 1)],
        }
        for i in range(12)
    ]
    examples.append({"input": "I have a bed. How many objects do I have?", "target": "one"})
    examples.append(
        {
            "input": "I have a cat and a dog. How many animals do I have?",
            "target_scores": {"2": 1, "3": 0},
        }
    )
    examples.append(dict(examples[0]))  # a duplicate input: dropped
    examples.append({"input": "I have a lamp. How many objects do I have?", "target": "many"})
    return {"name": "object_counting", "examples": examples}


def fake_colored_objects() -> dict[str, Any]:
    """BIG-bench reasoning_about_colored_objects' shape: one input template, target_scores."""
    colors = ["red", "blue", "teal", "grey", "pink", "gold"]
    examples: list[dict[str, Any]] = []
    for i in range(12):
        a, b, c = colors[i % 6], colors[(i + 1) % 6], colors[(i + 2) % 6]
        opener = ["you see", "I see", "there is", "you see several things arranged in a row:"]
        examples.append(
            {
                "input": f"On the desk, {opener[i % 4]} a {a} mug, two {b} pens, and a {c} "
                f"pair of sunglasses. What is the colour of item {i}?",
                "target_scores": {a: 1, b: 0, "three": 1 if i % 2 else 0},
                "comment": "what_color",
            }
        )
    examples.append(dict(examples[0]))  # a duplicate input: dropped
    examples.append({"input": "Not of the template. What?", "target_scores": {"red": 1}})
    return {"name": "reasoning_about_colored_objects", "examples": examples}


# -- the data builder -------------------------------------------------------------------------


def test_squad_splits_are_seeded_disjoint_by_paragraph_and_keep_distinct_gold_spans() -> None:
    squad = fake_squad()
    corpus, splits = bench_data.build_squad(squad, seed=0, sizes=SIZES)
    assert len(corpus) == 16 and corpus[0] == {
        "id": "Article_0#0",
        "title": "Article 0",
        "text": "Paragraph 0 of article 0.",
    }
    assert {k: len(v) for k, v in splits.items()} == SIZES
    rows = [r for split in splits.values() for r in split]
    paragraphs = [r["paragraph"] for r in rows]
    assert len(set(paragraphs)) == len(rows), "a paragraph feeds two rows"
    assert {r["paragraph"] for r in rows} <= {c["id"] for c in corpus}
    first = rows[0]
    a, p, q = first["id"][1:].split("-")
    assert first["expected"] == [f"answer {a}-{p}-{q}", f"the answer {a}-{p}-{q}"]
    assert first["question"] == f"What is fact {q} of paragraph {p} in article {a}?"
    assert bench_data.build_squad(squad, seed=0, sizes=SIZES) == (corpus, splits)
    _, other = bench_data.build_squad(squad, seed=1, sizes=SIZES)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]
    with pytest.raises(ValueError, match="need 16"):
        bench_data.build_squad(squad, sizes={"train": 10, "val": 3, "test": 3})


def test_object_count_splits_take_the_number_as_digits_and_drop_duplicates() -> None:
    task = fake_object_counting()
    splits = bench_data.build_object_count(task, seed=0, sizes=SIZES)
    rows = [r for split in splits.values() for r in split]
    assert {k: len(v) for k, v in splits.items()} == SIZES
    assert len({r["question"] for r in rows}) == len(rows)
    for row in rows:
        assert row["expected"][0].isdigit() and len(row["expected"]) == 1
    every = bench_data.build_object_count(task, seed=0, sizes={"train": 10, "val": 2, "test": 2})
    by_question = {r["question"]: r for split in every.values() for r in split}
    assert len(by_question) == 14, "the duplicate and the target with no number are dropped"
    bed = by_question["I have a bed. How many objects do I have?"]
    assert bed["expected"] == ["1"] and bed["kind"] == "objects"
    assert by_question["I have a cat and a dog. How many animals do I have?"]["expected"] == ["2"]
    assert bench_data.build_object_count(task, seed=0, sizes=SIZES) == splits
    assert bench_data.count_of({"target": ["twenty-one", "x"]}) == "21"
    assert bench_data.count_of({"target_scores": {"4": 1, "5": 0}}) == "4"
    assert bench_data.count_of({"target": "none"}) is None


def test_colored_objects_rows_hold_every_best_answer_and_the_ideal_object_list() -> None:
    task = fake_colored_objects()
    splits = bench_data.build_colored_objects(task, seed=0, sizes=SIZES)
    rows = [r for split in splits.values() for r in split]
    assert {k: len(v) for k, v in splits.items()} == SIZES
    every = bench_data.build_colored_objects(task, seed=0, sizes={"train": 12, "val": 0, "test": 0})
    assert len(every["train"]) == 12, "the duplicate and the input off the template are dropped"
    by_id = {r["id"]: r for r in every["train"]}
    first, second = by_id["co-0000"], by_id["co-0001"]
    assert first["expected"] == ["red"] and second["expected"] == ["blue", "three"]
    assert first["targets"] == {
        "objects": "1. a red mug\n2. two blue pens\n3. a teal pair of sunglasses"
    }
    assert by_id["co-0003"]["targets"]["objects"].startswith("1. a grey mug\n")  # "in a row:"
    assert first["kind"] == "what_color" and set(first) == {
        "id",
        "question",
        "expected",
        "targets",
        "kind",
    }
    assert bench_data.build_colored_objects(task, seed=0, sizes=SIZES) == splits
    assert {r["id"] for r in rows} == set(by_id)
    assert bench_data.objects_of("On the floor, there are three red cups and a pen. How many?") == (
        "1. three red cups\n2. a pen"
    )
    assert bench_data.objects_of("No scene here. What?") is None


STORY = (
    "Alice, Bob, and Claire are playing a game. At the start of the game, they are each "
    "holding a ball: Alice has a red ball, Bob has a green ball, and Claire has a pink ball. "
    "As the game progresses, pairs of players trade balls. First, Alice and Claire swap "
    "balls. Then, Bob and Claire swap balls. Finally, Alice and Bob swap balls. At the end "
    "of the game, Bob has the"
)


def fake_story(i: int) -> dict[str, Any]:
    """tracking_shuffled_objects' shape: the choices in the players' starting order."""
    return {
        "input": STORY + f" {i}",
        "target_scores": {"red ball.": 0, "green ball.": 0, "pink ball.": 1},
    }


def test_the_chain_task_tracks_the_swaps() -> None:
    story = STORY
    items = ["red ball", "green ball", "pink ball"]
    assert bench_data.holdings_of(story, items) == (
        "Alice: red ball\nBob: pink ball\nClaire: green ball"
    )
    scores = {"red ball.": 0, "green ball.": 0, "pink ball.": 1}
    task = {"examples": [{"input": story, "target_scores": scores}] * 2}
    rows = bench_data.build_tracking(task, sizes={"train": 1, "val": 0, "test": 0})["train"]
    assert rows[0]["expected"] == ["pink ball"] and rows[0]["targets"]["holdings"].count("\n") == 2


def test_a_temporal_candidate_lists_the_known_times() -> None:
    story = (
        "Today, Tom went to the park. Between what times could they have gone?\nWe know that: "
        "\nTom woke up at 7am.\nAnna saw Tom reading from 7am to 1pm.\nBen saw Tom at the "
        "deli from 3pm to 5pm.\nThe park was closed after 5pm.\nBetween what times?"
    )
    assert bench_data.timeline_of(story) == (
        "woke up at 7am\nbusy from 7am to 1pm\nbusy from 3pm to 5pm\nclosed after 5pm"
    )
    task = {"examples": [{"input": story, "target": "1pm to 3pm"}]}
    row = bench_data.build_temporal(task, sizes={"train": 1, "val": 0, "test": 0})["train"][0]
    assert row["expected"] == ["1pm to 3pm"] and "We know that:\nTom" in row["question"]


def test_the_oracle_targets_of_the_other_tasks() -> None:
    _, squad = bench_data.build_squad(fake_squad(), seed=0, sizes=SIZES)
    row = squad["train"][0]
    title, index = row["paragraph"].split("#")
    assert row["targets"] == {
        "passages": [f"{title.replace('_', ' ')}: Paragraph {index} of article {title[-1]}."]
    }
    counting = bench_data.build_object_count(fake_object_counting(), seed=0, sizes=SIZES)
    for row in counting["train"]:
        assert row["targets"] == {"items": f"{row['expected'][0]} {row['kind']}"}


def _tar_with(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


def test_extract_takes_only_the_named_members_then_builds_every_file(tmp_path: Path) -> None:
    squad = json.dumps(fake_squad()).encode()
    counting = json.dumps(fake_object_counting()).encode()
    colored = json.dumps(fake_colored_objects()).encode()
    tracking = json.dumps({"examples": [fake_story(i) for i in range(12)]}).encode()
    tasks = bench_data.TASKS_DIR
    sdist = tmp_path / "bigbench.tar.gz"
    _tar_with(
        sdist,
        {
            f"{tasks}/squad_shifts/squaddev_v1.1.json": squad,
            f"{tasks}/word_sorting/task.json": b'{"held": "out"}',
            f"{tasks}/object_counting/task.json": counting,
            f"{tasks}/reasoning_about_colored_objects/task.json": colored,
            f"{tasks}/tracking_shuffled_objects/three_objects/task.json": tracking,
            "../escape.txt": b"never written",
        },
    )
    members = {
        name: (member, hashlib.sha256(content).hexdigest())
        for name, member, content in [
            ("squaddev_v1.1.json", f"{tasks}/squad_shifts/squaddev_v1.1.json", squad),
            ("object_counting.json", f"{tasks}/object_counting/task.json", counting),
            (
                "reasoning_about_colored_objects.json",
                f"{tasks}/reasoning_about_colored_objects/task.json",
                colored,
            ),
            (
                "tracking_shuffled_objects_three.json",
                f"{tasks}/tracking_shuffled_objects/three_objects/task.json",
                tracking,
            ),
        ]
    }
    assert set(members) == set(bench_data.MEMBERS)
    assert all(member == bench_data.MEMBERS[n][0] for n, (member, _) in members.items())
    assert not any("word_sorting" in m for m, _ in bench_data.MEMBERS.values())
    raw = tmp_path / "data" / "raw"
    bench_data.extract_members(sdist, raw, members)
    assert sorted(p.name for p in raw.iterdir()) == sorted(members)
    assert not (tmp_path / "escape.txt").exists()

    manifest = bench_data.build_all(raw, tmp_path / "data", seed=0, sizes=SIZES)
    assert manifest["squad-rag"] == {"corpus": 16, **SIZES}
    assert manifest["object-count"] == manifest["colored-objects"] == SIZES
    assert manifest["tracking-three"] == SIZES and "tracking-three/val.jsonl" in manifest["files"]
    assert bench_data.is_built(tmp_path / "data")
    assert (
        "squad-rag/test.jsonl" in manifest["files"]
        and "raw/squaddev_v1.1.json" in (manifest["files"])
    )
    rows = (tmp_path / "data" / "squad-rag" / "train.jsonl").read_text().splitlines()
    assert len(rows) == SIZES["train"] and set(json.loads(rows[0])) >= {"question", "expected"}

    wrong = {"squaddev_v1.1.json": (members["squaddev_v1.1.json"][0], "0" * 64)}
    with pytest.raises(SystemExit, match="sha256"):
        bench_data.extract_members(sdist, tmp_path / "other", wrong)


def test_the_benchmark_systems_validate_and_count_with_the_registered_tool() -> None:
    from cotune.spec.job import load_job
    from cotune.tools.registry import get_python_tool

    squad = load_job(REPO / "examples" / "squad-rag" / "job.yaml")
    assert [c.name for c in squad.system.trainable_components] == ["query", "answer"]
    chain = load_job(REPO / "examples" / "tracking-three" / "job.yaml")
    assert [c.name for c in chain.system.trainable_components] == ["track", "answer"]
    assert chain.system.component("answer").reads == ["holdings", "question"]
    for candidate in ("colored-objects", "temporal-sequences"):
        job = load_job(REPO / "benchmarks" / "candidates" / candidate / "job.yaml")
        assert len(job.system.trainable_components) == 2
    counting = load_job(REPO / "examples" / "object-count" / "job.yaml")
    assert counting.system.component("count").args == {"function": "count_items"}
    count = get_python_tool("count_items")
    assert count("a clarinet\n- two violins\n3 flutes") == "6"
    assert count("Fruits:\na plum, an orange, and four peaches.") == "6"
    assert count(["1. bed", "2. chair"]) == "2"
    assert count("") == "0"


# -- statistics -------------------------------------------------------------------------------


def test_paired_statistics() -> None:
    assert quality.mcnemar_exact([False] * 5, [True] * 5) == (0, 5, 0.0625)
    assert quality.mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
    only_a, only_b, p = quality.mcnemar_exact([True] * 3 + [False] * 7, [False] * 3 + [True] * 7)
    assert (only_a, only_b) == (3, 7) and 0.34 < p < 0.35  # 2 * P(X <= 3), X ~ Bin(10, 1/2)
    assert quality.paired_bootstrap([0.0, 1.0, 1.0], [0.0, 1.0, 1.0]) == (0.0, 0.0, 0.0)
    diff, low, high = quality.paired_bootstrap([0.0] * 20, [1.0] * 10 + [0.0] * 10)
    assert diff == 0.5 and 0.25 <= low < 0.5 < high <= 0.75


def test_variants_are_loop_settings() -> None:
    from cotune.spec.job import parse_job
    from cotune.tiny import TINY_SYSTEM

    job = {"system": TINY_SYSTEM, "data": {"train": "t", "val": "v"}, "judge": {"model": "tiny"}}
    task = quality.Task("tiny-kb", REPO, job, ["exact_match"])
    jobs = {v: parse_job(quality.variant_job(task, v)) for v in quality.VARIANTS}
    assert not jobs["no-verify"].loop.verify_by_replay
    assert all(j.loop.verify_by_replay for v, j in jobs.items() if v != "no-verify")
    assert not jobs["binary-verify"].loop.graded_verification
    assert all(j.loop.graded_verification for v, j in jobs.items() if v != "binary-verify")
    assert not jobs["no-joint"].loop.joint_candidates
    assert all(j.loop.joint_candidates for v, j in jobs.items() if v != "no-joint")
    assert jobs["bootstrap"].judge is None and not jobs["bootstrap"].loop.gold_candidates
    assert jobs["bootstrap"].loop.resample_candidates == 0
    assert jobs["bootstrap"].train.method == jobs["sft-only"].train.method == "sft"
    assert jobs["no-judge"].judge is None and jobs["no-judge"].loop.resample_candidates >= 1
    assert jobs["full"].judge is not None and jobs["full"].train.method == "sft+dpo"
    oracle = jobs["oracle"]
    assert oracle.train.rows == "targets" and oracle.train.method == "sft"
    assert all(j.train.rows == "synthesized" for v, j in jobs.items() if v != "oracle")
    assert oracle.judge is None and not oracle.loop.gold_candidates
    assert oracle.loop.resample_candidates == oracle.loop.augment_rollouts == 0
    assert oracle.loop.epochs == 1 and oracle.loop.keep == "last"
    same = ("lora_r", "lora_alpha", "learning_rate", "epochs", "batch_size", "max_length")
    assert all(getattr(oracle.train, k) == getattr(jobs["full"].train, k) for k in same)
    assert oracle.data == jobs["full"].data


# -- the benchmark, end to end ----------------------------------------------------------------


def test_quality_benchmark_runs_on_the_tiny_model(
    tiny_model_dir: Path, vllm_engine: Any, tmp_path: Path
) -> None:
    argv = [
        "--tiny",
        "--model-path",
        str(tiny_model_dir),
        "--variants",
        "base,full,oracle",
        "--train",
        "8",
        "--val",
        "6",
        "--test",
        "8",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    # A section an earlier run wrote for another task is kept as it was.
    earlier = "# old header\n\n## object-count\n\nRun 2026-01-01 by `an earlier command`.\n\n"
    (tmp_path / "quality-tiny.md").write_text(earlier)
    assert quality.main(argv) == 0
    text = (tmp_path / "quality-tiny.md").read_text()
    assert "## tiny-kb" in text and "same small model" in text
    assert "## object-count\n\nRun 2026-01-01 by `an earlier command`." in text
    assert "# old header" not in text
    assert "by `python benchmarks/quality.py --tiny" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant | exact"))
    header = lines[start].split(" | ")
    assert header[2:5] == [
        "Δ exact_match vs base",
        "Δ exact_match vs bootstrap",
        "McNemar p vs base",
    ]
    scores = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = line.split(" | ")
        scores[cells[0][2:]] = cells
    assert list(scores) == ["base", "full", "oracle"]
    full = scores["full"]
    assert 0.0 <= float(full[1]) <= 1.0
    assert full[2].count("[") == 1 and full[2].count(",") == 1  # Δ vs base [95 % CI]
    p_value, discordant = full[4].split(" (")
    assert 0.0 <= float(p_value) <= 1.0 and discordant.rstrip(")").count("/") == 1
    assert "| engine calls |" in text and "| trained tokens |" in text
    assert (tmp_path / "quality-tiny-tiny-kb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](quality-tiny-tiny-kb.png)" in text
    runs = tmp_path / "runs-tiny" / "tiny-kb"
    assert len((runs / "full" / "traces" / "test.jsonl").read_text().splitlines()) == 8
    full_metrics = json.loads((runs / "full" / "metrics.json").read_text())
    base_metrics = json.loads((runs / "base" / "metrics.json").read_text())
    assert full_metrics["base_test_score"] == base_metrics["test_score"]

    # The oracle trained each component on its ideal targets only, through the loop's own
    # training stage: teacher-forced rows, no judge, no candidates, one epoch, kept.
    oracle = json.loads((runs / "oracle" / "metrics.json").read_text())
    assert oracle["best_epoch"] == 1 and oracle["base_test_score"] == base_metrics["test_score"]
    stages = {s["stage"]: s for s in oracle["stages"]}
    assert stages["train"]["trained_tokens"] > 0 and stages["credit"]["judge_calls"] == 0
    assert "| oracle | SFT on each component's ideal targets" in text

    # Finished variants are cached, not rerun.
    stamp = (runs / "full" / "metrics.json").stat().st_mtime_ns
    assert quality.main(argv) == 0
    assert (runs / "full" / "metrics.json").stat().st_mtime_ns == stamp


def _failed_tiny_trace(key: str) -> Any:
    from cotune.runtime import Span, Trace

    question, passages = f"what is the color of {key}?", [f"the color of {key} is teal."]
    spans = [
        Span(span_id="query", component="query", kind="llm", writes="query",
             inputs={"question": question}, output=f"color of {key}"),
        Span(span_id="search", component="search", kind="tool", writes="passages",
             inputs={"query": f"color of {key}"}, output=passages),
        Span(span_id="answer", component="answer", kind="llm", writes="answer",
             inputs={"question": question, "passages": passages}, output="blue"),
    ]  # fmt: skip
    return Trace(
        trace_id=key,
        example_id=key,
        inputs={"question": question},
        expected=["teal"],
        spans=spans,
        output="blue",
        score=0.0,
        passed=False,
    )


def test_the_judge_speed_part_gives_raw_vllm_exactly_the_judges_requests() -> None:
    """The raw side of ``speed_judge`` must time the same work: the same prompts, schemas,
    temperatures, seeds and token limits as the credit stage's first pass."""
    from doubles import ScriptedJudge, critique

    from cotune.judge import judge_traces
    from cotune.spec import parse_system
    from cotune.tiny import TINY_SYSTEM

    system = parse_system(TINY_SYSTEM)
    traces = [_failed_tiny_trace("zorpa"), _failed_tiny_trace("kalo")]
    judge = ScriptedJudge(lambda key, gold, index: [critique("answer", gold, "wrong colour")])
    judge_traces(judge, system, traces, samples=3, temperature=0.7, max_tokens=200, seed=4)
    raw = speed_judge.judge_requests(system, traces, 3, 0.7, 200, 4)
    assert len(raw) == 6 and all(r.json_schema for r in raw)
    assert raw == judge.requests  # every reply parsed, so no repair requests were added
