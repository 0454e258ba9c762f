"""How many of the judge's paraphrases of a train split ``loop.paraphrases`` would keep, and why
the others are dropped (``cotune/paraphrase.py``), with a few kept ones shown beside their
originals. One batched request per rewrite, on one engine; no loop, no training.

    python benchmarks/paraphrase_yield.py                      # kb-qa, SmolLM2-135M, 2 each
    python benchmarks/paraphrase_yield.py --model MODEL --n 3 --system S --data TRAIN.jsonl
    python benchmarks/paraphrase_yield.py --tiny               # the tiny test model and task
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", type=Path, default=ROOT / "examples/kb-qa/system.yaml")
    parser.add_argument("--data", type=Path, default=None, help="default: train.jsonl beside it")
    parser.add_argument("--model", default="smollm2-135m", help="the judge: a registry model")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model and task")
    parser.add_argument("--n", type=int, default=2, help="rewrites per example")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--show", type=int, default=6, help="kept rewrites to show")
    args = parser.parse_args(argv)

    from cotune.data import load_examples
    from cotune.engines import get_engine
    from cotune.models import prepare_model
    from cotune.paraphrase import MARK, paraphrase_examples
    from cotune.spec import load_system

    if args.tiny:
        import tempfile

        from cotune.tiny import write_tiny_example

        args.model = "tiny"
        folder = write_tiny_example(Path(tempfile.mkdtemp()), model_path=str(prepare_model("tiny")))
        args.system = folder / "system.yaml"
    system = load_system(args.system)
    examples = load_examples(args.data or args.system.parent / "train.jsonl", system)
    engine = get_engine("vllm", prepare_model(args.model))
    started = time.perf_counter()
    out = paraphrase_examples(
        engine,
        system,
        examples,
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=0,
    )
    seconds = time.perf_counter() - started
    print(
        f"Paraphrase yield, {system.name}: {len(examples)} train examples x {args.n} rewrites by "
        f"{args.model} (temperature {args.temperature}, max_tokens {args.max_tokens}) in "
        f"{seconds:.1f} s; {datetime.date.today()}, {machine.describe()}\n"
    )
    print("| outcome | rewrites |\n| --- | --- |")
    print(f"| kept | {len(out.examples)} |")
    for reason, count in out.dropped.most_common():
        print(f"| dropped: {reason} | {count} |")
    print(f"| asked | {out.calls} |")
    originals = {e.id: e for e in examples}
    for kept in out.examples[: args.show]:
        source = originals[kept.id.rsplit(MARK, 1)[0]]
        for name, value in kept.inputs.items():
            if value != source.inputs[name]:
                print(f"\n- {source.inputs[name]!r}\n  -> {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
