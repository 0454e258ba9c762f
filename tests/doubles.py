"""Test doubles for logic tests of the loop (DESIGN.md §8: doubles only where a test is about
the logic around them, and named as such).

- ``ScriptedEngine`` answers the tiny-kb prompts by rule, without a model.
- ``ScriptedJudge`` answers judge prompts with verdicts built by a rule, and (``metric:
  judge``) scoring prompts with scores by another rule, without a model.
- ``RecordingDispatcher`` stands in for the service's ``Dispatcher``: it records and queues
  each job and runs nothing.
- ``FakeTrainer`` stands in for ``cotune.training.train_adapter``: it writes a small PEFT-shaped
  folder and records the rows it was given, without training anything.

Also one setting shared by the tests that start a vLLM server process.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.judge.score import OUTPUT_LINE
from cotune.paraphrase import SYSTEM_PROMPT as PARAPHRASE_PROMPT
from cotune.spec.job import TrainConfig
from cotune.store import JobStatus
from cotune.tiny import COLORS
from cotune.training import DPOPair, SFTRow, TrainResult

# A deadline, not a speed check: healthy servers pass in under a minute, but on a loaded 2-core
# machine (CI with other processes) a start took over 180 s. Waiting ends as soon as it is up.
SERVER_START_SECONDS = 600
GARBAGE_QUERY = "nothing useful"
UNKNOWN = "unknown"
QUESTION = re.compile(r"what is the color of (\w+)\?")
FIRST_PASSAGE = re.compile(r"^1\. the color of (\w+) is (\w+)\.", re.MULTILINE)
GOLD = re.compile(r"^Gold answer\(s\) \(metric [^)]*\): (.+)$", re.MULTILINE)
SCORED_OUTPUT = re.compile(rf"^{OUTPUT_LINE} \([^)]*\): (.*)$", re.MULTILINE)


class RecordingDispatcher:
    """Test double for a ``Dispatcher``: records each dispatched job and moves it to
    ``queued``, as a real one does once the job's files are materialised. Runs nothing."""

    def __init__(self) -> None:
        self.store: Any = None
        self.dispatched: list[str] = []

    def dispatch(self, job_id: str) -> None:
        assert self.store is not None, "set .store to the app's JobStore first"
        self.dispatched.append(job_id)
        self.store.transition(job_id, JobStatus.queued)

    def queue_depth(self) -> int | None:
        return None


def stub_registry_model(home: Path, name: str = "tiny") -> Path:
    """A registry model folder under ``COTUNE_HOME`` that resolves but is never loaded (the
    runs that use it have scripted engines): empty config and tokenizer, an empty safetensors."""
    model = home / "models" / name
    model.mkdir(parents=True)
    for file in ("config.json", "tokenizer.json"):
        (model / file).write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return model


JUDGED_RUBRIC = "names the colour of the thing the question asks about, and nothing else"


def write_judged_tiny_example(
    folder: Path, *, model_path: str, splits: tuple[int, int, int]
) -> Path:
    """The tiny-kb example as a judge-scored job has it: ``metric: judge`` with a rubric, and
    no ``expected`` in any split."""
    import yaml

    from cotune.tiny import write_tiny_example

    write_tiny_example(folder, splits=splits, model_path=model_path)
    system = yaml.safe_load((folder / "system.yaml").read_text())
    system.update(metric="judge", rubric=JUDGED_RUBRIC)
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    for split in ("train", "val", "test"):
        path = folder / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [{k: v for k, v in row.items() if k != "expected"} for row in rows]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def question_key(text: str) -> str:
    """The key a tiny-kb question (or a prompt holding one) asks about."""
    match = QUESTION.search(text)
    assert match is not None, f"no tiny-kb question in {text!r}"
    return match.group(1)


def is_hard(key: str) -> bool:
    """Keys the base query writer gets wrong: about half of them, fixed by a stable hash."""
    return zlib.crc32(key.encode()) % 2 == 0


def adapter_epoch(adapter: str | None) -> int | None:
    """The epoch an adapter key or path was trained in (``.../epoch-3/adapters/query``)."""
    if adapter is None:
        return None
    match = re.search(r"epoch-(\d+)/adapters/", adapter)
    return int(match.group(1)) if match else None


QueryRule = Callable[[str, str | None], bool]  # (key, adapter) -> the query comes out right
AnswerRule = Callable[[str | None], bool]  # adapter -> the answer writer answers wrong


class StepsAside:
    """An engine double's release/reacquire: no model to step aside, only the state is kept,
    for tests of who releases when."""

    released = False

    def release(self) -> None:
        self.released = True

    def reacquire(self) -> None:
        self.released = False


@dataclass
class EngineCall:
    component: str
    adapter: str | None
    temperature: float
    keys: list[str]


class ScriptedEngine(StepsAside):
    """Test double for an ``InferenceEngine`` on the tiny-kb task: answers by rule, no model.

    - The query writer ("Write a search query for: ...") returns ``color of <key>`` when
      ``query_ok(key, adapter)`` holds (by default: the key is not ``is_hard``), else the
      garbage query ``nothing useful`` (no corpus term: bm25 then returns no passage).
    - The answer writer ("Passages: ...") returns the colour in passage 1 (``unknown`` when
      there is none), or ``wrong`` when ``answer_wrong(adapter)`` holds.
    - Sampled requests (temperature > 0 with a seed) stand for re-sampling: the query writer is
      right for even seeds and writes ``junk <seed>`` for odd ones; the answer writer names the
      colour ``COLORS[seed % len(COLORS)]`` when the seed is a multiple of 3, else reads
      passage 1 as usual.

    Every ``generate`` call is kept in ``calls``; ``stats`` counts them as an engine would.
    """

    kind = "vllm"
    model_id = "scripted-tiny"

    def __init__(
        self,
        query_ok: QueryRule | None = None,
        answer_wrong: AnswerRule | None = None,
    ) -> None:
        self.query_ok: QueryRule = query_ok or (lambda key, adapter: not is_hard(key))
        self.answer_wrong: AnswerRule = answer_wrong or (lambda adapter: False)
        self.stats = EngineStats()
        self.calls: list[EngineCall] = []

    def supports_json_schema(self) -> bool:
        return True

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        self.reacquire()  # as the real engines do
        texts = []
        component = "?"
        keys = []
        for request in requests:
            prompt = request.messages[-1]["content"]
            key = question_key(prompt)
            keys.append(key)
            sampled = request.temperature > 0 and request.seed is not None
            if prompt.startswith("Write a search query for:"):
                component = "query"
                if sampled:
                    assert request.seed is not None
                    ok = request.seed % 2 == 0
                    texts.append(f"color of {key}" if ok else f"junk {request.seed}")
                else:
                    ok = self.query_ok(key, adapter)
                    texts.append(f"color of {key}" if ok else GARBAGE_QUERY)
            elif prompt.startswith("Passages:"):
                component = "answer"
                if sampled and request.seed is not None and request.seed % 3 == 0:
                    texts.append(COLORS[request.seed % len(COLORS)])
                elif self.answer_wrong(adapter):
                    texts.append("wrong")
                else:
                    first = FIRST_PASSAGE.search(prompt)
                    texts.append(first.group(2) if first else UNKNOWN)
            else:
                raise AssertionError(f"ScriptedEngine got an unknown prompt: {prompt!r}")
        self.calls.append(EngineCall(component, adapter, requests[0].temperature, keys))
        results = [
            GenerationResult(text=t, prompt_tokens=7, completion_tokens=3, finish_reason="stop")
            for t in texts
        ]
        self.stats.add(results, 0.0)
        return results


# (key, gold, sample index of this trace's request in the batch) -> critiques
Proposer = Callable[[str, str, int], list[dict[str, Any]]]
# (key, final output) -> a score, or a str sent as the reply's text as it is
ScoreRule = Callable[[str, str], float | str]
# a paraphrase request's fields -> the rewritten fields (a str: the reply's text as it is)
ParaphraseRule = Callable[[dict[str, str]], dict[str, str] | str]


def critique(
    span: str, should_have_output: str | None, text: str, blame: float = 0.9
) -> dict[str, Any]:
    return {
        "span_id": span,
        "component": span,
        "error_type": "wrong_content",
        "critique": text,
        "should_have_output": should_have_output,
        "blame": blame,
        "confidence": 0.8,
    }


class ScriptedJudge(StepsAside):
    """Test double for the judge's engine: builds each verdict with ``propose`` (from the key
    and the gold answer it reads in the judge prompt, and the sample's index among this
    trace's requests in the batch), returns it as JSON. A scoring prompt (``metric: judge``)
    is answered ``{"reason", "score"}`` with ``score(key, output)`` (a str from it is the
    reply's text as it is); a repair request is answered from its original prompt; a
    paraphrase request (``loop.paraphrases``) with ``paraphrase(fields)``. Keeps every request
    in ``requests``, the scoring ones also in ``score_requests``, the paraphrase ones in
    ``paraphrase_requests``.
    """

    kind = "vllm"
    model_id = "scripted-judge"

    def __init__(
        self,
        propose: Proposer,
        score: ScoreRule | None = None,
        paraphrase: ParaphraseRule | None = None,
    ) -> None:
        self.propose = propose
        self.score = score
        self.paraphrase = paraphrase
        self.stats = EngineStats()
        self.requests: list[GenerationRequest] = []
        self.score_requests: list[GenerationRequest] = []
        self.paraphrase_requests: list[GenerationRequest] = []

    def supports_json_schema(self) -> bool:
        return True

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        assert adapter is None, "the judge runs on its base model"
        self.reacquire()
        self.requests.extend(requests)
        seen: dict[str, int] = {}
        texts = []
        for request in requests:
            if request.messages[0]["content"] == PARAPHRASE_PROMPT:
                assert self.paraphrase is not None, "a paraphrase request needs a rule"
                self.paraphrase_requests.append(request)
                shown = request.messages[-1]["content"].split("\nFields:\n", 1)[1]
                lines = shown.rsplit("\nReturn the JSON object now.", 1)[0].splitlines()
                fields = dict(line.split(": ", 1) for line in lines)
                rewrite = self.paraphrase(fields)
                texts.append(rewrite if isinstance(rewrite, str) else json.dumps(rewrite))
                continue
            repair = request.messages[-1]["content"].startswith("That reply cannot be used")
            prompt = request.messages[-3 if repair else -1]["content"]
            key = question_key(prompt)
            scored = SCORED_OUTPUT.search(prompt)
            if scored is not None:
                assert self.score is not None, "a scoring prompt needs a score rule"
                self.score_requests.append(request)
                value = self.score(key, scored.group(1).strip())
                reply = {"reason": f"scripted score of {key}", "score": value}
                texts.append(value if isinstance(value, str) else json.dumps(reply))
                continue
            gold_match = GOLD.search(prompt)
            gold = gold_match.group(1).strip() if gold_match else ""
            index = seen.get(key, 0)
            seen[key] = index + 1
            components = self.propose(key, gold, index)
            verdict = {
                "system_correct": False,
                "failure_summary": "scripted verdict",
                "components": components,
                "decisive_span_id": components[0]["span_id"] if components else None,
            }
            texts.append(json.dumps(verdict))
        results = [
            GenerationResult(text=t, prompt_tokens=50, completion_tokens=40, finish_reason="stop")
            for t in texts
        ]
        self.stats.add(results, 0.0)
        return results


@dataclass
class TrainCall:
    component: str
    seed: int
    rows: list[SFTRow]
    pairs: list[DPOPair]


class TrainerCrash(RuntimeError):
    pass


@dataclass
class FakeTrainer:
    """Test double for ``cotune.training.train_adapter`` (same signature): trains nothing,
    writes ``adapter_config.json`` and a small ``adapter_model.safetensors`` (safetensors, no
    pickle) and records every call in ``calls``. ``crash_on_call`` (1-based) raises
    ``TrainerCrash`` once, on that call, before writing anything.
    """

    crash_on_call: int | None = None
    calls: list[TrainCall] = field(default_factory=list)
    attempts: int = 0

    def __call__(
        self,
        base_model: Path,
        sft_rows: list[SFTRow],
        dpo_pairs: list[DPOPair],
        config: TrainConfig,
        out_dir: Path,
        *,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> TrainResult:
        import numpy as np
        from safetensors.numpy import save_file

        self.attempts += 1
        if self.crash_on_call is not None and self.attempts == self.crash_on_call:
            raise TrainerCrash(f"FakeTrainer crashes on call {self.attempts}")
        assert (Path(base_model) / "config.json").is_file()
        assert sft_rows, "the loop never trains a component without rows"
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": config.lora_r, "lora_alpha": config.lora_alpha})
        )
        weights = {
            "base_model.model.layers.0.q_proj.lora_A.weight": np.full(
                (config.lora_r, 4), float(len(sft_rows)), dtype=np.float32
            ),
            "base_model.model.layers.0.q_proj.lora_B.weight": np.full(
                (4, config.lora_r), float(seed), dtype=np.float32
            ),
        }
        save_file(weights, str(out_dir / "adapter_model.safetensors"))
        self.calls.append(TrainCall(out_dir.name, seed, list(sft_rows), list(dpo_pairs)))
        return TrainResult(
            adapter_dir=out_dir,
            sft_losses=[1.0, 0.5],
            dpo_losses=[0.7] if dpo_pairs else [],
            sft_steps=2,
            dpo_steps=1 if dpo_pairs else 0,
            trained_tokens=10 * len(sft_rows) + 20 * len(dpo_pairs),
            seconds=0.0,
        )


def scripted_context_options(*, with_judge: bool = True) -> dict[str, Any]:
    """``ThreadDispatcher(context_options=...)`` for API tests: the scripted engine, a judge
    that proposes the right query, and the fake trainer (logic doubles, named as such)."""
    options: dict[str, Any] = {"engines": {"tiny": ScriptedEngine()}, "trainer": FakeTrainer()}
    if with_judge:
        options["judge"] = ScriptedJudge(
            lambda key, gold, i: [critique("query", f"color of {key}", "search the key")]
        )
    return options
