import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotune.errors import SpecError
from cotune.spec import load_system, parse_system, template_fields
from cotune.tiny import TINY_SYSTEM

Spec = dict[str, Any]


def base() -> Spec:
    """The DESIGN.md §4 example: query (llm) -> search (bm25) -> answer (llm)."""
    return copy.deepcopy(TINY_SYSTEM)


def comp(spec: Spec, name: str) -> dict[str, Any]:
    return next(c for c in spec["components"] if c["name"] == name)


def refused(mutate: Callable[[Spec], Any]) -> SpecError:
    spec = base()
    mutate(spec)
    with pytest.raises(SpecError) as info:
        parse_system(spec)
    return info.value


def assert_names(err: SpecError, component: str | None, field: str, param: str) -> None:
    message = str(err)
    if component is not None:
        assert f"component {component!r}" in message, message
    assert field in message, message
    assert err.param == param


def test_the_design_example_is_valid() -> None:
    system = parse_system(base())
    assert [c.name for c in system.components] == ["query", "search", "answer"]
    assert [c.name for c in system.trainable_components] == ["query", "answer"]
    assert system.base_dir is None


# -- DESIGN.md §4: the bad cases --------------------------------------------------------------


def test_unknown_model() -> None:
    err = refused(lambda s: comp(s, "answer").update(model="gpt-9"))
    assert_names(err, "answer", "'model'", "components.answer.model")
    assert "unknown model 'gpt-9'" in str(err)


def test_unknown_tool() -> None:
    err = refused(lambda s: comp(s, "search").update(tool="google"))
    assert_names(err, "search", "'tool'", "components.search.tool")
    assert "unknown tool 'google'" in str(err)


def test_field_read_before_any_component_writes_it() -> None:
    err = refused(lambda s: comp(s, "answer").update(reads=["question", "passages", "context"]))
    assert_names(err, "answer", "'reads'", "components.answer.reads")
    assert "'context' is read before any component writes it" in str(err)


def test_two_writers_of_one_field() -> None:
    err = refused(lambda s: comp(s, "search").update(writes="query"))
    assert_names(err, "search", "'writes'", "components.search.writes")
    assert "also written by 'query'" in str(err)


def test_writing_a_system_input() -> None:
    err = refused(lambda s: comp(s, "query").update(writes="question"))
    assert_names(err, "query", "'writes'", "components.query.writes")
    assert "is a system input" in str(err)


def test_cycle() -> None:
    def make_cycle(s: Spec) -> None:
        comp(s, "query").update(reads=["question", "passages"], prompt="{question} {passages}")

    err = refused(make_cycle)
    assert "form a cycle" in str(err)
    assert "'query'" in str(err) and "'search'" in str(err)
    assert err.param == "components.query.reads"


def test_placeholder_not_in_reads() -> None:
    err = refused(lambda s: comp(s, "answer").update(reads=["question"]))
    assert_names(err, "answer", "'prompt'", "components.answer.prompt")
    assert "placeholder {passages} is not in 'reads'" in str(err)


def test_placeholder_not_in_reads_in_system_message() -> None:
    err = refused(lambda s: comp(s, "query").update(system="You answer about {passages}."))
    assert_names(err, "query", "'system'", "components.query.system")


# -- more bad cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["{question.upper}", "{question[0]}", "{0}", "{}", "{question!r}", "{question:>20}"],
)
def test_placeholder_with_attribute_index_or_format_access(prompt: str) -> None:
    err = refused(lambda s: comp(s, "query").update(prompt=prompt))
    assert_names(err, "query", "'prompt'", "components.query.prompt")
    assert "placeholder" in str(err)


def test_malformed_template() -> None:
    err = refused(lambda s: comp(s, "query").update(prompt="Query for {question"))
    assert_names(err, "query", "'prompt'", "components.query.prompt")


def test_template_fields_allows_escaped_braces() -> None:
    assert template_fields('JSON like {{"a": 1}} for {question}') == ["question"]


def test_unknown_field_in_a_component() -> None:
    err = refused(lambda s: comp(s, "query").update(temprature=0.7))
    assert_names(err, "query", "'temprature'", "components.query.temprature")
    assert "unknown field" in str(err)


def test_unknown_top_level_field() -> None:
    err = refused(lambda s: s.update(metrc="f1"))
    assert_names(err, None, "'metrc'", "metrc")
    assert "unknown field" in str(err)


def test_tool_fields_on_an_llm_component() -> None:
    err = refused(lambda s: comp(s, "query").update(tool="bm25"))
    assert_names(err, "query", "'tool'", "components.query.tool")
    err = refused(lambda s: comp(s, "query").update(args={"k": 2}))
    assert_names(err, "query", "'args'", "components.query.tool")


def test_llm_fields_on_a_tool_component() -> None:
    err = refused(lambda s: comp(s, "search").update(prompt="{query}"))
    assert_names(err, "search", "'prompt'", "components.search.prompt")
    assert "belongs to llm components" in str(err)


def test_bad_metric() -> None:
    err = refused(lambda s: s.update(metric="bleu"))
    assert_names(err, None, "'metric'", "metric")
    assert "unknown metric 'bleu'" in str(err) and "exact_match" in str(err)


@pytest.mark.parametrize("threshold", [1.5, -0.1, "high"])
def test_bad_pass_threshold(threshold: Any) -> None:
    err = refused(lambda s: s.update(pass_threshold=threshold))
    assert_names(err, None, "'pass_threshold'", "pass_threshold")


def test_pass_threshold_accepts_a_fraction() -> None:
    spec = base()
    spec.update(metric="f1", pass_threshold=0.5)
    assert parse_system(spec).pass_threshold == 0.5


def test_metric_judge_needs_a_rubric() -> None:
    err = refused(lambda s: s.update(metric="judge"))
    assert_names(err, None, "'rubric'", "rubric")
    assert "required with metric 'judge'" in str(err) and "e.g. rubric:" in str(err)
    err = refused(lambda s: s.update(metric="judge", rubric=""))
    assert_names(err, None, "'rubric'", "rubric")


def test_a_rubric_is_refused_with_a_gold_metric() -> None:
    err = refused(lambda s: s.update(metric="f1", rubric="short answers"))
    assert_names(err, None, "'rubric'", "rubric")
    assert "only for metric 'judge'" in str(err) and "metric 'f1'" in str(err)
    assert "'expected'" in str(err)


def test_a_judged_system_passes_at_half_unless_it_says_otherwise() -> None:
    spec = base()
    spec.update(metric="judge", rubric="names the colour")
    system = parse_system(spec)
    assert system.rubric == "names the colour" and system.pass_threshold == 0.5
    assert parse_system(system.model_dump(mode="json")) == system  # a dumped spec reloads
    spec.update(pass_threshold=0.8)
    assert parse_system(spec).pass_threshold == 0.8


def test_the_judged_kb_qa_example_validates_with_its_data() -> None:
    from cotune.data import load_examples
    from cotune.quote import quote_job
    from cotune.spec.job import load_job

    job = load_job(Path(__file__).parents[2] / "examples" / "kb-qa" / "job-judged.yaml")
    assert job.system.metric == "judge" and job.system.rubric and job.judge is not None
    train = job.data_path("train")
    assert train is not None and load_examples(train, job.system)
    assert quote_job(job)["per_stage"]["baseline"]["judge_calls"] > 0


def test_the_feedback_kb_qa_example_validates_with_its_rated_runs() -> None:
    from cotune.feedback import load_feedback
    from cotune.quote import quote_job
    from cotune.spec.job import load_job

    job = load_job(Path(__file__).parents[2] / "examples" / "kb-qa" / "job-feedback.yaml")
    assert job.data.train is None and job.system.metric == "judge"
    path = job.data_path("feedback")
    assert path is not None
    rows = load_feedback(path, job.system)
    assert {r.feedback.rating for r in rows} >= {0.0, 1.0}
    assert any(r.feedback.comment for r in rows) and any(r.expected for r in rows)
    assert quote_job(job)["examples"]["feedback"] == len(rows)


def test_missing_prompt() -> None:
    err = refused(lambda s: comp(s, "answer").pop("prompt"))
    assert_names(err, "answer", "'prompt'", "components.answer.prompt")
    assert "required" in str(err)


def test_missing_model() -> None:
    err = refused(lambda s: comp(s, "answer").pop("model"))
    assert_names(err, "answer", "'model'", "components.answer.model")


def test_python_tool_not_registered() -> None:
    def python_tool(s: Spec) -> None:
        comp(s, "search").update(tool="python", args={"function": "os.system"})

    err = refused(python_tool)
    assert_names(err, "search", "'args.function'", "components.search.args.function")
    assert "'os.system' is not a registered python tool" in str(err)
    assert "count_lines" in str(err)


def test_registered_python_tool_is_accepted() -> None:
    spec = base()
    comp(spec, "search").update(tool="python", args={"function": "count_lines"})
    assert parse_system(spec).component("search").args == {"function": "count_lines"}


def test_bm25_without_corpus() -> None:
    err = refused(lambda s: comp(s, "search").update(args={"k": 3}))
    assert_names(err, "search", "'args.corpus'", "components.search.args.corpus")


def test_output_not_written() -> None:
    err = refused(lambda s: s.update(output="final"))
    assert_names(err, None, "'output'", "output")
    assert "no component writes 'final'" in str(err)


def test_output_that_is_an_input() -> None:
    err = refused(lambda s: s.update(output="question"))
    assert_names(err, None, "'output'", "output")


def test_bad_kind_names_the_component() -> None:
    err = refused(lambda s: comp(s, "query").update(kind="agent"))
    assert_names(err, "query", "'kind'", "components.query.kind")


def test_duplicate_component_names() -> None:
    err = refused(lambda s: comp(s, "answer").update(name="query"))
    assert "two components are named 'query'" in str(err)
    assert err.param == "components"


def test_model_ref_needs_exactly_one_of_name_or_path() -> None:
    err = refused(lambda s: s["models"].update(tiny={"name": "a", "path": "/b"}))
    assert_names(err, None, "'models.tiny'", "models.tiny")


# -- loading ----------------------------------------------------------------------------------


def test_load_system_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "system.yaml"
    path.write_text(yaml.safe_dump(base(), sort_keys=False))
    system = load_system(path)
    assert system.name == "tiny-kb"
    assert system.base_dir == tmp_path.resolve()
    assert system.resolve_path("corpus.jsonl") == tmp_path.resolve() / "corpus.jsonl"


def test_load_system_from_json(tmp_path: Path) -> None:
    path = tmp_path / "system.json"
    path.write_text(json.dumps(base()))
    system = load_system(path)
    assert system.component("search").args == {"corpus": "corpus.jsonl", "k": 3}
    assert system.base_dir == tmp_path.resolve()


def test_load_system_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_system(tmp_path / "absent.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid json"):
        load_system(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_system(tmp_path / "list.yaml")
    spec = base()
    comp(spec, "answer")["model"] = "nope"
    (tmp_path / "system.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as info:
        load_system(tmp_path / "system.yaml")
    assert info.value.param == "components.answer.model"


# -- graph helpers ----------------------------------------------------------------------------


def diamond() -> Spec:
    """question -> rewrite -> (search, draft) -> answer; components declared out of order."""

    def llm(name: str, reads: list[str], writes: str) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "llm",
            "model": "tiny",
            "reads": reads,
            "writes": writes,
            "prompt": " ".join(f"{{{r}}}" for r in reads),
        }

    return {
        "name": "diamond",
        "inputs": ["question"],
        "output": "answer",
        "models": {"tiny": {"name": "tiny"}},
        "components": [
            llm("answer", ["question", "passages", "draft"], "answer"),
            {
                "name": "search",
                "kind": "tool",
                "tool": "bm25",
                "reads": ["query"],
                "writes": "passages",
                "args": {"corpus": "kb.jsonl"},
            },
            llm("draft", ["query"], "draft"),
            llm("rewrite", ["question"], "query"),
        ],
    }


def test_levels() -> None:
    levels = parse_system(diamond()).levels()
    assert [[c.name for c in level] for level in levels] == [
        ["rewrite"],
        ["search", "draft"],
        ["answer"],
    ]
    tiny = parse_system(base()).levels()
    assert [[c.name for c in level] for level in tiny] == [["query"], ["search"], ["answer"]]


def test_downstream() -> None:
    system = parse_system(diamond())
    assert system.downstream("rewrite") == ["search", "draft", "answer"]
    assert system.downstream("draft") == ["answer"]
    assert system.downstream("answer") == []
    with pytest.raises(KeyError, match="no component 'nope'"):
        system.downstream("nope")


# -- values the probe found accepted (finding 7) and a name longer than its column (finding 4) --


def job(**extra: Any) -> dict[str, Any]:
    return {"system": base(), "data": {"train": "t.jsonl", "val": "v.jsonl"}, **extra}


@pytest.mark.parametrize(
    ("mutate", "param", "said"),
    [
        (lambda j: j.update(loop={"seed": 10**40}), "loop.seed", "less than or equal"),
        (lambda j: j.update(loop={"seed": 1e40}), "loop.seed", None),
        (lambda j: j.update(loop={"seed": -1}), "loop.seed", "greater than or equal"),
        (lambda j: j.update(loop={"epochs": True}), "loop.epochs", "got true"),
        (lambda j: j.update(loop={"joint_candidates": "maybe"}), "loop.joint_candidates", None),
        (lambda j: j.update(loop={"paraphrases": 9}), "loop.paraphrases", "less than or equal"),
        (lambda j: j.update(loop={"paraphrases": 2}), "loop.paraphrases", "has no 'judge'"),
        (
            lambda j: j.update(
                loop={"paraphrases": 1},
                judge={"model": "tiny"},
                data={"train": "t.jsonl", "val": "v.jsonl", "format": "openai"},
            ),
            "loop.paraphrases",
            "'messages'",
        ),
        (lambda j: j.update(train={"learning_rate": True}), "train.learning_rate", "got true"),
        (lambda j: j.update(budget={"max_judge_calls": False}), "budget.max_judge_calls", None),
        (lambda j: j.update(base_dir="/etc"), "base_dir", "unknown field"),
        (lambda j: j["system"].update(base_dir="/etc"), "system.base_dir", "unknown field"),
        (lambda j: j["system"].update(name="s" * 256), "system.name", "255"),
        (
            lambda j: comp(j["system"], "answer").update(max_tokens=True),
            "system.components.answer.max_tokens",
            "got true",
        ),
    ],
)
def test_a_job_value_the_loop_cannot_use_is_refused_naming_it(
    mutate: Callable[[dict[str, Any]], Any], param: str, said: str | None
) -> None:
    from cotune.spec.job import parse_job

    spec = job()
    mutate(spec)
    with pytest.raises(SpecError) as info:
        parse_job(spec)
    assert info.value.param == param, info.value
    if said is not None:
        assert said in str(info.value), info.value


def test_the_largest_seed_and_a_255_character_name_are_accepted() -> None:
    from cotune.spec.job import parse_job

    spec = job(loop={"seed": 2**31 - 1})
    spec["system"]["name"] = "s" * 255
    parsed = parse_job(spec)
    assert parsed.loop.seed == 2**31 - 1 and len(parsed.system.name) == 255
