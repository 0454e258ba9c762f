"""The `cotune` command and the speed benchmark, in-process on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cotune.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_eval_prints_the_score_and_writes_traces(
    tiny_example: Path, vllm_engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "eval",
            str(tiny_example / "system.yaml"),
            str(tiny_example / "val.jsonl"),
            "--out",
            str(tmp_path),
            "--limit",
            "10",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert summary["examples"] == 10 and 0.0 <= summary["score"] <= 1.0
    traces = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert len(traces) == 10 and json.loads(traces[0])["spans"][0]["component"] == "query"
    assert json.loads((tmp_path / "score.json").read_text()) == summary


def test_eval_names_a_bad_system_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "system.yaml"
    bad.write_text(
        "name: s\ninputs: [q]\noutput: a\nmodels: {m: {path: x}}\ncomponents:\n"
        "  - {name: ans, kind: llm, model: nope, reads: [q], writes: a, "
        "prompt: '{q}'}\n"
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "x", "expected": "y"}\n')
    assert main(["eval", str(bad), str(data)]) == 1
    err = capsys.readouterr().err
    assert "component 'ans'" in err and "field 'model'" in err and "'nope'" in err


def test_run_dry_run_prints_a_quote(tiny_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tiny_example / "quote-job.yaml"
    job.write_text(
        "system: system.yaml\n"
        "data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}\n"
        "judge: {model: tiny}\nloop: {epochs: 2, rollout_batch: 16}\n"
    )
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("rollout", "credit", "verify", "synthesize", "evaluate", "total"):
        assert f"| {stage} |" in out
    assert "judge calls" in out


def test_run_refuses_a_bad_setting_naming_it(
    tiny_example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tiny_example / "bad-job.yaml"
    job.write_text(
        "system: system.yaml\ndata: {train: train.jsonl, val: val.jsonl}\nloop: {epochs: 0}\n"
    )
    assert main(["run", str(job), "--dry-run"]) == 1
    assert "loop.epochs" in capsys.readouterr().err


def test_speed_benchmark_prints_its_table(
    tiny_example: Path, vllm_engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.pop(0)
    out = tmp_path / "speed.md"
    assert (
        speed.main(
            [
                "--system",
                str(tiny_example / "system.yaml"),
                "--data",
                str(tiny_example / "train.jsonl"),
                "--limit",
                "8",
                "--hf-batch",
                "8",
                "--train-epochs",
                "1",
                "--rounds",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = out.read_text()
    assert "cotune runtime" in table and "raw vllm.LLM.chat" in table and "raw HF generate" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "x |" in line]
    # three engines, the judge's four rows (whole stage, first pass, raw, raw without schema),
    # the adapter's two op sets, cotune's trainer, TRL's
    assert len(rows) == 11
    assert "cotune judge_traces" in table and "its first pass only" in table
    assert "no schema" in table
    grouped = next(line for line in rows if "cotune grouped ops" in line)
    same, total = grouped.split("|")[-2].strip().split(" of ")
    assert int(total) == 8 * 2  # 8 examples, two LLM components
    assert int(same) >= 12  # the same function: only float rounding may flip a greedy token
    assert "vLLM's PyTorch LoRA ops" in table
    assert "cotune train_adapter (SFT, answer)" in table and "plain TRL SFTTrainer" in table
    epoch = next(line for line in table.splitlines() if line.startswith("| **epoch**"))
    seconds, engines, trainers = (float(c) for c in epoch.split("|")[2:5])
    assert seconds > 0 and engines > 0 and trainers > 0 and engines + trainers <= seconds
    # The job reused this process's engine (built by the rollout part): no new base model.
    assert "Base-model loads: 0 vLLM engine(s) created by the job" in table


def test_keys_create_list_revoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cotune.settings import get_settings
    from cotune.store import JobStore
    from cotune.store.accounts import AccountStore

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    monkeypatch.setenv("COTUNE_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--tenant", "acme", "--name", "ci"]) == 0
        created = json.loads(capsys.readouterr().out)
        accounts = AccountStore(JobStore(url))
        assert accounts.verify_key(created["key"]) is not None
        assert main(["keys", "list", "--tenant", "acme"]) == 0
        listed = capsys.readouterr().out
        assert created["key_id"] in listed and created["key"] not in listed
        assert main(["keys", "revoke", created["key_id"]]) == 0
        assert accounts.verify_key(created["key"]) is None
        assert main(["keys", "revoke", created["key_id"]]) == 1
    finally:
        get_settings.cache_clear()


def test_models_list_on_a_new_machine_makes_the_default_database_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first command on a machine where COTUNE_HOME holds nothing yet: the default SQLite
    store's folder is made, not reported as 'unable to open database file'."""
    from cotune.settings import get_settings

    home = tmp_path / "new-home"
    monkeypatch.setenv("COTUNE_HOME", str(home))
    monkeypatch.delenv("COTUNE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["models", "list"]) == 0
    finally:
        get_settings.cache_clear()
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert "tiny" in names and "smollm2-135m" in names
    assert (home / "service" / "cotune.db").is_file()


def test_eval_checks_a_judge_against_gold_without_showing_it_the_gold(
    tiny_model_dir: Path,
    vllm_engine: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``cotune eval --judge MODEL --gold-metric M`` on a judge-scored system whose rows have
    gold: the real tiny model judges every output with ``expected`` hidden from it, and the
    summary counts its passes against M on the rows' gold; the traces written keep the gold."""
    import yaml
    from doubles import JUDGED_RUBRIC

    from cotune.metrics import score
    from cotune.scoring import JudgeScorer
    from cotune.tiny import write_tiny_example

    folder = write_tiny_example(tmp_path / "task", model_path=str(tiny_model_dir), splits=(4, 6, 4))
    system = yaml.safe_load((folder / "system.yaml").read_text())
    system.update(metric="judge", rubric=JUDGED_RUBRIC)
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    shown: list[Any] = []
    judge = JudgeScorer.score

    def recording(self: JudgeScorer, traces: Any) -> None:
        shown.extend(t.expected for t in traces)
        judge(self, traces)

    monkeypatch.setattr(JudgeScorer, "score", recording)
    out = tmp_path / "eval"
    argv = ["eval", str(folder / "system.yaml"), str(folder / "val.jsonl"), "--judge", "tiny",
            "--gold-metric", "exact_match", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert shown == [None] * 6  # the judge saw no gold
    agreement = summary["judge"]["agreement"]
    cells = ("pass_right", "pass_wrong", "fail_right", "fail_wrong", "unscored")
    assert sum(agreement[c] for c in cells) == 6 and agreement["gold_metric"] == "exact_match"
    assert summary["judge"]["calls"] >= 6
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    gold = {r["id"]: r["expected"] for r in map(json.loads, (folder / "val.jsonl").open())}
    assert {t["example_id"]: t["expected"] for t in traces} == {k: [v] for k, v in gold.items()}
    right = sum(score("exact_match", t["output"], gold[t["example_id"]]) == 1.0 for t in traces)
    counted = agreement["pass_right"] + agreement["fail_right"]
    assert counted <= right <= counted + agreement["unscored"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--judge", "tiny"], "--judge tiny: system 'tiny-kb' is scored by metric 'exact_match'"),
        (["--gold-metric", "exact_match"], "--gold-metric checks a judge: give --judge MODEL"),
    ],
)
def test_eval_refuses_judge_options_that_do_not_fit(
    tiny_example: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", str(tiny_example / "system.yaml"), str(tiny_example / "val.jsonl"), *extra]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
