"""Generation time of a trained run under different batch limits, on the same test rows.

    .venv/bin/python benchmarks/generation_batching.py RUN_DIR [--examples 200]

Loads the run as `loratune evaluate` does (adapter merged into the weights) and times
``loratune.evaluate.generation.generate`` on the first test rows with each pair of
``generation.batch_size`` and ``generation.batch_tokens`` in ``LIMITS``, all in this one
process, one after another. Reports the batches formed, the time, and how many texts differ
from the first setting's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# (batch_size, batch_tokens): the recipe's fixed batches first, then two token budgets.
LIMITS = [(16, None), (48, 6144), (64, 8192)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="trained run folder, for example the quickstart's output")
    parser.add_argument("--examples", type=int, default=200, help="first N test rows (default: 200)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core unless OMP_NUM_THREADS is set)")
    args = parser.parse_args(argv)
    from loratune.runs import is_run_dir

    if not is_run_dir(args.run):
        parser.error(f"{args.run}: not a loratune run folder (no loratune.json)")
    source = harness.start_parent(args.threads)

    from loratune.config import DataConfig, load_config
    from loratune.data.formatting import encode_prompt
    from loratune.data.loading import load_split
    from loratune.evaluate.generation import generate, plan_batches
    from loratune.models.inference import load_run_for_inference
    from loratune.runs import CONFIG_FILE

    loaded = load_run_for_inference(args.run)
    run_generation = load_config(args.run / CONFIG_FILE).generation
    examples, _ = load_split(DataConfig(source=source), "test", args.examples)
    prompts = [encode_prompt(loaded.tokenizer, loaded.prompt, ex.text, loaded.max_source_length)[0] for ex in examples]
    print(f"Run: {args.run} ({loaded.base_model}), {len(prompts)} test rows, "
          f"{sum(len(ids) for ids in prompts)} prompt tokens, at most {run_generation.max_new_tokens} new tokens\n")

    rows, first_texts = [], None
    for batch_size, batch_tokens in LIMITS:
        generation = run_generation.model_copy(update={"batch_size": batch_size, "batch_tokens": batch_tokens})
        batches = plan_batches([len(ids) for ids in prompts], batch_size, batch_tokens)
        start = time.perf_counter()
        outputs = generate(loaded.model, loaded.tokenizer, prompts, loaded.family, generation)
        seconds = time.perf_counter() - start
        texts = [item.text for item in outputs]
        first_texts = first_texts or texts
        differ = sum(a != b for a, b in zip(first_texts, texts))
        padded = sum(len(batch) * max(len(prompts[i]) for i in batch) for batch in batches)
        rows.append([batch_size, batch_tokens or "none", len(batches), padded, seconds,
                     len(prompts) / seconds, f"{differ} of {len(texts)}"])
        print(f"  batch_size {batch_size}, batch_tokens {batch_tokens}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(harness.format_table(
        ["batch_size", "batch_tokens", "batches", "padded prompt positions", "generation (s)", "examples/s",
         "texts that differ from the first row"], rows))
    print(f"\nLoad average at end: {harness.machine_description().rsplit('load average ', 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
