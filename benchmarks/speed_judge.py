"""Speed, part 5: the judge's cost (``benchmarks/speed.py`` runs it after the rollout part).

The credit stage's judge calls (``cotune.judge.judge_traces``: K samples per failed trace
under the verdict's JSON schema, then one batched repair call for the replies that did not
parse) against raw ``vllm.LLM.chat`` on the *same* prompts, schemas and sampling (K seeded
samples each), on the same engine, taking turns ``rounds`` times (medians). Two more raw rows
say where the time goes: the same requests without the schema (what schema-constrained
decoding costs), and the long tail (the slowest reply's length against the median: a batch
lasts as long as its longest reply).
"""

from __future__ import annotations

import datetime
import statistics
import time
from typing import Any

import machine


def judge_requests(system: Any, traces: list[Any], samples: int, temperature: float,
                   max_tokens: int, seed: int) -> list[Any]:  # fmt: skip
    """The first pass's requests exactly as ``judge_traces`` builds them (its own helpers)."""
    from cotune.engines.base import GenerationRequest
    from cotune.judge.prompt import judge_messages
    from cotune.judge.schema import verdict_schema

    requests = []
    for trace in traces:
        messages = judge_messages(system, trace, include_gold=True)
        schema = verdict_schema(system, trace)
        for i in range(samples):
            requests.append(
                GenerationRequest(
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0.0 if samples == 1 else temperature,
                    seed=seed + i,
                    json_schema=schema,
                )
            )
    return requests


def _raw(llm: Any, requests: list[Any], *, schema: bool) -> dict[str, Any]:
    """The requests through ``llm.chat`` in one call, as a vLLM user would write it."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    params = [
        SamplingParams(
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            seed=r.seed if r.temperature > 0 else None,
            structured_outputs=StructuredOutputsParams(json=r.json_schema) if schema else None,
        )
        for r in requests
    ]
    started = time.perf_counter()
    outputs = llm.chat([r.messages for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    cut = sum(o.outputs[0].finish_reason == "length" for o in outputs)
    return {"seconds": seconds, "tokens": sum(lengths), "lengths": lengths, "cut": cut}


class _Timed:
    """The engine, timing each ``generate`` call: the judge's first pass, then its repairs."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.calls: list[tuple[float, int]] = []  # (seconds, completion tokens) per call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, requests: list[Any], adapter: str | None = None) -> list[Any]:
        started = time.perf_counter()
        results = self._engine.generate(requests, adapter)
        seconds = time.perf_counter() - started
        self.calls.append((seconds, sum(r.completion_tokens for r in results)))
        return results


def _cotune(engine: Any, system: Any, traces: list[Any], samples: int, temperature: float,
            max_tokens: int, seed: int) -> dict[str, Any]:  # fmt: skip
    from cotune.judge import judge_traces
    from cotune.judge.prompt import NOT_REPAIRED

    timed = _Timed(engine)
    before = engine.stats.completion_tokens
    started = time.perf_counter()
    outcomes = judge_traces(timed, system, traces, samples=samples, temperature=temperature,
                            max_tokens=max_tokens, seed=seed)  # fmt: skip
    seconds = time.perf_counter() - started
    calls = sum(o.calls for o in outcomes)
    first = timed.calls[0] if timed.calls else (0.0, 0)
    return {
        "seconds": seconds,
        "tokens": engine.stats.completion_tokens - before,
        "first_pass": {"seconds": first[0], "tokens": first[1]},
        "repair_seconds": sum(c[0] for c in timed.calls[1:]),
        "repairs": calls - samples * len(traces),
        "failures": sum(len(o.failures) for o in outcomes),
        "loops": sum(f"; {NOT_REPAIRED}: " in f for o in outcomes for f in o.failures),
    }


def judge_speed(system: Any, traces: list[Any], engine: Any, *, samples: int = 3,
                temperature: float = 0.7, max_tokens: int = 384, seed: int = 1,
                rounds: int = 3) -> dict[str, Any]:  # fmt: skip
    """Medians of ``rounds`` alternating runs of cotune's judge and raw vLLM (with and
    without the schema) on ``traces`` (scored: the judge prompt shows the score)."""
    requests = judge_requests(system, traces, samples, temperature, max_tokens, seed)
    # Warm-up at the full batch size: the first batch of a new size is slower on vLLM-CPU (the
    # rollout part saw it too), and cotune runs first in every round.
    _raw(engine.llm, requests, schema=True)
    runs: dict[str, list[dict[str, Any]]] = {"cotune": [], "raw": [], "raw-no-schema": []}
    for _ in range(max(rounds, 1)):
        runs["cotune"].append(
            _cotune(engine, system, traces, samples, temperature, max_tokens, seed)
        )
        runs["raw"].append(_raw(engine.llm, requests, schema=True))
        runs["raw-no-schema"].append(_raw(engine.llm, requests, schema=False))

    def median(name: str) -> dict[str, Any]:
        ordered = sorted(runs[name], key=lambda r: r["seconds"])
        return ordered[len(ordered) // 2]

    return {
        "system": system.name,
        "traces": len(traces),
        "samples": samples,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "cotune": median("cotune"),
        "raw": median("raw"),
        "raw_no_schema": median("raw-no-schema"),
    }


def format_judge(result: dict[str, Any]) -> str:
    raw = result["raw"]
    raw_rate = raw["tokens"] / raw["seconds"]
    lengths = raw["lengths"]
    rows = [
        ("cotune judge_traces (schema, K seeded samples, repair pass)", result["cotune"]),
        ("cotune judge_traces, its first pass only", result["cotune"]["first_pass"]),
        ("raw vllm.LLM.chat, same prompts, schemas and sampling", raw),
        ("raw vllm.LLM.chat, same prompts and sampling, no schema", result["raw_no_schema"]),
    ]
    lines = [
        f"Judge speed, {result['system']}: {result['traces']} traces x K={result['samples']} "
        f"samples, max_tokens {result['max_tokens']}, cotune and raw vLLM taking turns (median "
        f"of {result['rounds']} runs each) on one engine; {datetime.date.today()}, "
        f"{machine.describe()}",
        "",
        "| judge | seconds | completion tokens | tokens/s | vs raw (same schema) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['tokens']} | {rate:.1f} | {rate / raw_rate:.2f}x |"
        )
    cotune = result["cotune"]
    lines += [
        "",
        f"- cotune's repair pass: {cotune['repairs']} repair request(s) in "
        f"{cotune.get('repair_seconds', 0.0):.2f} s; "
        f"{cotune['failures']} sample(s) failed, {cotune.get('loops', 0)} of them cut at "
        "max_tokens in a loop and not repaired (`cotune.judge.prompt.no_repair_reason`)",
        f"- the long tail (raw, with schema): replies of {min(lengths)}-{max(lengths)} tokens, "
        f"median {statistics.median(lengths):.0f}; {raw['cut']} of {len(lengths)} cut at "
        "max_tokens",
    ]
    return "\n".join(lines)
