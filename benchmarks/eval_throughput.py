"""Evaluation throughput: loratune's batched generation against one example at a time.

    .venv/bin/python benchmarks/eval_throughput.py [--run RUN_DIR] [--sides ...] [--examples 48]

Every side runs greedy decoding with SmolLM2 on the same SAMSum test prompts, each in a
child process of its own. The baseline calls ``generate`` once per example
(benchmarks/baseline.py). loratune calls ``loratune.evaluate.generation.generate`` with the
recipe's generation settings (length-sorted batches, left padding for causal models, KV
cache) on the model as its evaluation loads it, with the adapter merged into the weights.
The baseline keeps the adapter as a separate PEFT layer, as the reference recipe does.

The adapter comes from a trained run folder (``--run``, for example the quickstart's output),
or else is a fresh one with the recipe's settings; PEFT initialises its B matrices to zero,
so a fresh adapter leaves the text the base model's. Reported: generated tokens/s,
examples/s, peak RSS, ROUGE of every side, and how many texts differ from the baseline's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RECIPE = "smollm2-samsum.yaml"
# loratune-unmerged: loratune's batched generation with the adapter left as a PEFT layer.
SIDES = ["baseline", "loratune", "loratune-unmerged"]
DEFAULT_SIDES = ["baseline", "loratune"]


# ----------------------------------------------------------------------------- child side


def load_with_adapter(config):
    """Load the base model in fp32 and wrap it with a fresh LoRA adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    from loratune.models.loading import load_model
    from loratune.models.lora import build_lora_config

    set_seed(config.train.seed)
    loaded = load_model(config.model)
    loaded.model = get_peft_model(loaded.model, build_lora_config(config.lora, loaded.model, loaded.family))
    loaded.model.eval()
    return loaded


def load_side_model(spec: dict, config):
    """Return (loaded model, prompt format), with the adapter merged on the loratune side only."""
    from loratune.data.formatting import PromptFormat
    from loratune.models.inference import load_run_for_inference

    merge = spec["side"] == "loratune"
    if spec.get("run"):
        loaded = load_run_for_inference(Path(spec["run"]), merge=merge)
        return loaded, loaded.prompt
    loaded = load_with_adapter(config)
    if merge:
        loaded.model = loaded.model.merge_and_unload()
    return loaded, PromptFormat.for_tokenizer(loaded.family, config.data.prompt, loaded.tokenizer)


def run_side(spec: dict) -> None:
    from loratune.config import build_config
    from loratune.data.formatting import encode_prompt
    from loratune.data.loading import load_split
    from loratune.evaluate.generation import generate

    import baseline

    config = build_config(spec["config"])
    loaded, fmt = load_side_model(spec, config)
    examples, _ = load_split(config.data, "test", spec["examples"])
    prompts = [encode_prompt(loaded.tokenizer, fmt, ex.text, config.data.max_source_length)[0] for ex in examples]

    start = time.perf_counter()
    if spec["side"] == "baseline":
        outputs = baseline.generate_one_at_a_time(
            loaded.model, loaded.tokenizer, prompts, loaded.family, config.generation.max_new_tokens
        )
    else:
        generated = generate(loaded.model, loaded.tokenizer, prompts, loaded.family, config.generation)
        outputs = [{"text": item.text, "new_tokens": item.new_tokens} for item in generated]
    seconds = time.perf_counter() - start

    # Prompt processing alone (one new token), batched as loratune does. Both sides must do
    # this work, so baseline time / this time bounds the speedup that batching can reach.
    prefill_seconds = None
    if spec["side"] == "loratune":
        start = time.perf_counter()
        generate(loaded.model, loaded.tokenizer, prompts, loaded.family,
                 config.generation.model_copy(update={"max_new_tokens": 1}))
        prefill_seconds = time.perf_counter() - start

    harness.write_result(spec, {
        "prefill_seconds": prefill_seconds,
        "side": spec["side"],
        "seconds": seconds,
        "texts": [item["text"] for item in outputs],
        "new_tokens": [item["new_tokens"] for item in outputs],
        "prompt_tokens": sum(len(ids) for ids in prompts),
        "references": [ex.references for ex in examples],
        "batch_size": 1 if spec["side"] == "baseline" else config.generation.batch_size,
        "peak_rss_mb": harness.peak_rss_mb(),
    })


# ----------------------------------------------------------------------------- parent side


def side_config(source: str, examples: int) -> dict:
    config = yaml.safe_load((harness.CONFIGS / RECIPE).read_text())
    config["data"].update(source=source, max_test_samples=examples)
    return config


def report(model_key: str, results: dict[str, dict], max_new_tokens: int) -> str:
    """Format one model's sides as a table; the last column is loratune over the baseline."""
    from loratune.evaluate.rouge import rouge_scores

    sides = list(results)
    base, ours = results["baseline"], results["loratune"]

    def per_side(name, value, ratio=True):
        values = [value(results[side]) for side in sides]
        return [name, *values, f"{value(ours) / value(base):.2f}x" if ratio else ""]

    def new_tokens(result):
        return sum(result["new_tokens"])

    rows = [
        per_side("generate batch size", lambda r: r["batch_size"], ratio=False),
        per_side("examples", lambda r: len(r["texts"]), ratio=False),
        per_side("prompt tokens", lambda r: r["prompt_tokens"], ratio=False),
        per_side(f"generated tokens (max {max_new_tokens} each)", new_tokens, ratio=False),
        per_side("generation time (s)", lambda r: r["seconds"]),
        per_side("generated tokens/s", lambda r: new_tokens(r) / r["seconds"]),
        per_side("examples/s", lambda r: len(r["texts"]) / r["seconds"]),
        per_side("peak RSS (MiB)", lambda r: r["peak_rss_mb"]),
    ]
    prefill = ours["prefill_seconds"]
    rows.append(["prompt processing alone, batched (s)", *[prefill if side == "loratune" else "" for side in sides], ""])
    rows.append(["max speedup with that floor", *[""] * len(sides), f"{base['seconds'] / prefill:.2f}x"])
    rouge = {side: rouge_scores(results[side]["texts"], results[side]["references"]) for side in sides}
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        rows.append([key, *[f"{rouge[side][key]:.4f}" for side in sides], ""])

    differ = {side: [i for i, (a, b) in enumerate(zip(base["texts"], results[side]["texts"])) if a != b]
              for side in sides}
    rows.append(["texts that differ from the baseline",
                 *["" if side == "baseline" else f"{len(differ[side])} of {len(base['texts'])}" for side in sides], ""])
    text = f"### {model_key}\n\n" + harness.format_table(["metric", *sides, "loratune / baseline"], rows)
    for side in sides:
        for index in differ[side][:3]:
            text += (f"\n\nexample {index} differs:\n  baseline: {base['texts'][index]!r}\n"
                     f"  {side}: {results[side]['texts'][index]!r}")
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=DEFAULT_SIDES)
    parser.add_argument("--examples", type=int, default=48, help="first N test examples (default: 48)")
    parser.add_argument("--run", type=Path, help="trained run folder whose adapter every side loads")
    harness.add_process_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        spec = harness.read_child_spec(args.child)
        run_side(spec)
        return 0

    if args.run:
        from loratune.runs import is_run_dir

        if not is_run_dir(args.run):
            parser.error(f"--run {args.run}: not a loratune run folder (no loratune.json)")
    source = harness.start_parent(args.threads)
    print(f"Adapter: {args.run or 'fresh, B = 0'}\n")
    config = side_config(source, args.examples)
    results = {}
    for side in dict.fromkeys(["baseline", *args.sides, "loratune"]):
        spec = {"side": side, "config": config, "examples": args.examples, "threads": args.threads}
        if args.run:
            spec["run"] = str(args.run.resolve())
        results[side] = harness.run_child(Path(__file__), spec, f"smollm2 {side}")
    print(report("smollm2", results, config["generation"]["max_new_tokens"]), flush=True)
    print(f"Load average at end: {harness.machine_description().rsplit('load average ', 1)[1]}")
    all_results = {"machine": harness.machine_description(), "source": source, "adapter": str(args.run), "results": results}
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
