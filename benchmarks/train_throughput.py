"""Training throughput of loratune against the reference recipe, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [--models smollm2 t5-tiny t5-small] [--steps 10]

For each model, three sides train LoRA for the same number of optimizer steps on the same
SAMSum training rows, each in a child process of its own. The sides are the baseline
(benchmarks/baseline.py), loratune forced to fp32, and loratune with the recipe's settings
(bf16 autocast on CPUs with bf16 matrix instructions, the LoRA branch in fp32, and gradient
checkpointing where the recipe turns it on). Reported per side: real (non-pad) tokens/s, samples/s, peak RSS,
MFU (benchmarks/flops.py over the best matmul rate measured at the start of the run), the loss
of every step, and the loss on held-out validation rows after training, computed the same
way for every side (fp32, one example at a time, label tokens only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MODELS = {
    # model key: (recipe in configs/, default optimizer steps)
    "smollm2": ("smollm2-samsum.yaml", 8),
    "t5-tiny": ("flan-t5-base-samsum.yaml", 24),
    "t5-small": ("flan-t5-base-samsum.yaml", 24),
}
SIDES = {
    # side: (implementation, train.precision)
    "baseline": ("baseline", "fp32"),
    "loratune-fp32": ("loratune", "fp32"),
    "loratune": ("loratune", "auto"),
    "loratune-packing": ("loratune", "auto"),
    "loratune-no-checkpointing": ("loratune", "auto"),
    "loratune-low-memory": ("loratune", "auto"),
}
DEFAULT_SIDES = ["baseline", "loratune-fp32", "loratune"]


def side_config(recipe: str, model_path: str | None, source: str, steps: int, batch_size: int,
                lengths: tuple[int, int] | None, side: str, out_dir: str) -> dict:
    """Return the recipe from configs/ with the benchmark's data, steps and precision."""
    config = yaml.safe_load((harness.CONFIGS / recipe).read_text())
    if model_path:
        config["model"]["name_or_path"] = model_path
    data = config["data"]
    data.update(source=source, max_train_samples=steps * batch_size)
    if lengths:
        data.update(max_source_length=lengths[0], max_target_length=lengths[1])
    train = config["train"]
    train.update(
        output_dir=out_dir, max_steps=steps, batch_size=batch_size, gradient_accumulation_steps=1,
        logging_steps=1, save_steps=10_000, report_to=[], overwrite_output_dir=True,
        precision=SIDES[side][1],
    )
    if side == "loratune-packing":
        train.update(packing=True, group_by_length=False)
    if side == "loratune-no-checkpointing":
        train.update(gradient_checkpointing=False)
    if side == "loratune-low-memory":
        train.update(low_memory_allocator=True)
    config["eval"] = {"run_after_training": False}
    return config


# ----------------------------------------------------------------------------- child side


def instrument(trainer, family: str) -> dict:
    """Time the training loop and count the real and fed tokens of every batch."""
    from transformers import TrainerCallback

    record = {"losses": [], "step_ends": [], "real_tokens": 0, "fed_tokens": 0, "examples": 0}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append(logs["loss"])

    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        for feature in features:
            mask = feature.get("attention_mask")
            record["real_tokens"] += sum(mask) if mask is not None else len(feature["input_ids"])
            if family == "seq2seq":
                record["real_tokens"] += sum(1 for label in feature["labels"] if label != harness.IGNORE_INDEX)
        record["fed_tokens"] += batch["input_ids"].numel()
        if family == "seq2seq":
            record["fed_tokens"] += batch["labels"].numel()
        record["examples"] += len(features)
        return batch

    trainer.data_collator = counting_collator
    trainer.add_callback(StepTimer())
    return record


def example_lengths(config, tokenizer, fmt) -> list[tuple[int, int]]:
    """Return (source, label) token counts of the training rows, as both sides tokenize them."""
    from loratune.data.formatting import encode_prompt, encode_target
    from loratune.data.loading import load_split

    examples, _ = load_split(config.data, config.data.train_split, config.data.max_train_samples)
    lengths = []
    for example in examples:
        prompt, _ = encode_prompt(tokenizer, fmt, example.text, config.data.max_source_length)
        target, _ = encode_target(tokenizer, fmt, example.target, config.data.max_target_length)
        source = len(prompt) + (len(target) if fmt.family == "causal" else 0)
        lengths.append((source, len(target)))
    return lengths


def heldout_loss(model, tokenizer, fmt, config, count: int) -> float:
    """Return the mean loss per label token on the first ``count`` validation rows (fp32, unpadded)."""
    import torch

    from loratune.data.formatting import build_training_features
    from loratune.data.loading import load_split

    examples, _ = load_split(config.data, config.data.validation_split, count)
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for example in examples:
            features, _, _ = build_training_features(
                tokenizer, fmt, example.text, example.target,
                config.data.max_source_length, config.data.max_target_length,
            )
            labels = torch.tensor([features["labels"]])
            output = model(input_ids=torch.tensor([features["input_ids"]]), labels=labels)
            counted = labels[:, 1:] if fmt.family == "causal" else labels
            label_count = int((counted != harness.IGNORE_INDEX).sum())
            total += output.loss.item() * label_count
            tokens += label_count
    return total / tokens


def train_baseline(config, work_dir: Path):
    from transformers import set_seed

    from loratune.data.formatting import PromptFormat
    from loratune.data.loading import load_split
    from loratune.models.loading import load_model

    import baseline

    set_seed(config.train.seed)
    loaded = load_model(config.model)
    fmt = PromptFormat.for_tokenizer(loaded.family, config.data.prompt, loaded.tokenizer)
    examples, _ = load_split(config.data, config.data.train_split, config.data.max_train_samples)
    dataset = baseline.padded_features(
        examples, loaded.tokenizer, fmt, config.data.max_source_length, config.data.max_target_length
    )
    trainer = baseline.reference_trainer(loaded.model, loaded.tokenizer, loaded.family, dataset, config, work_dir)
    record = instrument(trainer, loaded.family)
    trainer.train()
    return trainer.model, loaded.tokenizer, fmt, loaded.family, record, "fp32"


def train_loratune(config, work_dir: Path):
    from loratune.data.formatting import PromptFormat
    from loratune.runs import load_run_info
    from loratune.train import recipe

    captured = {}
    build_trainer = recipe.build_trainer

    def build_and_instrument(config, run_dir, loaded, *args, **kwargs):
        trainer = build_trainer(config, run_dir, loaded, *args, **kwargs)
        captured.update(trainer=trainer, tokenizer=loaded.tokenizer, family=loaded.family,
                        record=instrument(trainer, loaded.family))
        return trainer

    recipe.build_trainer = build_and_instrument
    run_dir = recipe.train(config)
    fmt = PromptFormat(**load_run_info(run_dir).prompt)
    precision = "bf16" if captured["trainer"].args.bf16 else "fp32"
    return captured["trainer"].model, captured["tokenizer"], fmt, captured["family"], captured["record"], precision


def run_side(spec: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flops

    from loratune.config import build_config

    config = build_config(spec["config"])
    work_dir = Path(spec["work_dir"])
    if SIDES[spec["side"]][0] == "baseline":
        model, tokenizer, fmt, family, record, precision = train_baseline(config, work_dir / "baseline")
    else:
        model, tokenizer, fmt, family, record, precision = train_loratune(config, work_dir)

    lengths = example_lengths(config, tokenizer, fmt)
    seconds = record["step_ends"][-1] - record["start"]
    result = {
        "side": spec["side"],
        "precision": precision,
        "steps": len(record["step_ends"]),
        "examples": record["examples"],
        "real_tokens": record["real_tokens"],
        "fed_tokens": record["fed_tokens"],
        "loop_seconds": seconds,
        "losses": record["losses"],
        "useful_flops": flops.useful_flops(model, family, lengths),
        "attention_flops": sum(flops.attention_flops(model.config, family, s, t) for s, t in lengths),
        "peak_rss_mb": harness.peak_rss_mb(),
    }
    # The held-out loss runs after the RSS reading, so it cannot raise the training peak.
    result["heldout_loss"] = heldout_loss(model, tokenizer, fmt, config, spec["heldout"])
    harness.write_result(spec, result)


# ----------------------------------------------------------------------------- parent side


def fixed_lengths(recipe: str, model_path: str, source: str, count: int) -> tuple[int, int] | None:
    """Return the max lengths loratune would pick for the benchmark rows, or None if the recipe sets them."""
    config = yaml.safe_load((harness.CONFIGS / recipe).read_text())
    data = config.get("data", {})
    if data.get("max_source_length") and data.get("max_target_length"):
        return None
    from transformers import AutoTokenizer

    from loratune.config import DataConfig
    from loratune.data.formatting import PromptFormat
    from loratune.data.lengths import choose_max_lengths, measure_lengths
    from loratune.data.loading import load_split

    data_config = DataConfig(**dict(data, source=source))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, _ = load_split(data_config, "train", count)
    fmt = PromptFormat.for_tokenizer("seq2seq", data_config.prompt, tokenizer)
    sources, targets = measure_lengths(examples, tokenizer, fmt)
    return choose_max_lengths(sources, targets, data_config.source_length_percentile,
                              data_config.target_length_percentile, None, None, None)


def benchmark_model(model_key: str, source: str, folder: Path, rows: int) -> tuple[str | None, tuple[int, int] | None]:
    """Return the model path and fixed max lengths for ``model_key`` over ``rows`` training rows.

    A T5 model is built in ``folder``, and its lengths are the ones loratune picks from the
    data. For SmolLM2 both are None: the recipe names the model and sets the lengths.
    """
    if model_key not in harness.T5_SHAPES:
        return None, None
    model_path = harness.t5_for_benchmark(model_key, source, folder)
    return model_path, fixed_lengths(MODELS[model_key][0], model_path, source, rows)


def derived(result: dict, peaks: dict) -> dict:
    seconds = result["loop_seconds"]
    peak = peaks["bf16" if result["precision"] == "bf16" else "fp32"]
    return {
        "tokens_per_s": result["real_tokens"] / seconds,
        "samples_per_s": result["examples"] / seconds,
        "pad_share": 1 - result["real_tokens"] / result["fed_tokens"],
        "mfu": result["useful_flops"] / seconds / (peak * 1e9),
    }


def report(model_key: str, results: dict[str, dict], peaks: dict) -> str:
    sides = list(results)
    stats = {side: derived(results[side], peaks) for side in sides}
    ratio_side = "loratune" if "loratune" in results else sides[-1]
    headers = ["metric", *sides] + ([f"{ratio_side} / baseline"] if "baseline" in results else [])

    def row(name, values, ratio=True):
        cells = [name, *values]
        if "baseline" in results:
            base, ours = values[sides.index("baseline")], values[sides.index(ratio_side)]
            cells.append(f"{ours / base:.2f}x" if ratio and isinstance(base, float) and base else "")
        return cells

    rows = [
        row("precision", [results[s]["precision"] for s in sides], ratio=False),
        row("optimizer steps", [results[s]["steps"] for s in sides], ratio=False),
        row("examples", [results[s]["examples"] for s in sides], ratio=False),
        row("real tokens", [results[s]["real_tokens"] for s in sides], ratio=False),
        row("pad share of fed positions", [f"{stats[s]['pad_share']:.0%}" for s in sides], ratio=False),
        row("training loop (s)", [results[s]["loop_seconds"] for s in sides]),
        row("real tokens/s", [stats[s]["tokens_per_s"] for s in sides]),
        row("samples/s", [stats[s]["samples_per_s"] for s in sides]),
        row("peak RSS (MiB)", [results[s]["peak_rss_mb"] for s in sides]),
        row("useful TFLOP", [results[s]["useful_flops"] / 1e12 for s in sides], ratio=False),
        row("attention share of useful FLOPs",
            [f"{results[s]['attention_flops'] / results[s]['useful_flops']:.1%}" for s in sides], ratio=False),
        row("MFU", [f"{stats[s]['mfu']:.1%}" for s in sides], ratio=False),
        row("held-out loss after training", [f"{results[s]['heldout_loss']:.4f}" for s in sides], ratio=False),
    ]
    table = harness.format_table(headers, rows)
    steps = max(len(results[s]["losses"]) for s in sides)
    curve = [[step + 1] + [f"{results[s]['losses'][step]:.4f}" if step < len(results[s]["losses"]) else ""
                            for s in sides] for step in range(steps)]
    curve_table = harness.format_table(["step", *sides], curve)
    return f"### {model_key}\n\n{table}\n\nTraining loss per optimizer step:\n\n{curve_table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=DEFAULT_SIDES)
    parser.add_argument("--steps", type=int, help="optimizer steps for every model (default: per model)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--heldout", type=int, default=16, help="validation rows for the held-out loss")
    harness.add_process_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        spec = harness.read_child_spec(args.child)
        run_side(spec)
        return 0

    source = harness.start_parent(args.threads)
    peaks = {name: harness.peak_matmul_gflops(name) for name in ("fp32", "bf16")}
    print(f"Peak matmul at start: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s\n")

    all_results = {"machine": harness.machine_description(), "source": source, "peaks": peaks, "models": {}}
    with tempfile.TemporaryDirectory(prefix="loratune-bench-model-") as folder:
        for model_key in args.models:
            recipe, default_steps = MODELS[model_key]
            steps = args.steps or default_steps
            model_path, lengths = benchmark_model(model_key, source, Path(folder), steps * args.batch_size)
            results = {}
            for side in args.sides:
                if side == "loratune-packing" and model_key != "smollm2":
                    continue
                config = side_config(recipe, model_path, source, steps, args.batch_size, lengths, side, f"{folder}/run")
                spec = {"side": side, "config": config, "heldout": args.heldout, "threads": args.threads}
                results[side] = harness.run_child(Path(__file__), spec, f"{model_key} {side}")
            all_results["models"][model_key] = results
            print(report(model_key, results, peaks), flush=True)

    end_peaks = {name: harness.peak_matmul_gflops(name) for name in ("fp32", "bf16")}
    all_results["end_peaks"] = end_peaks
    print(f"Peak matmul at end: fp32 {end_peaks['fp32']:.0f} GFLOP/s, bf16 {end_peaks['bf16']:.0f} GFLOP/s "
          f"(MFU above uses the start values; a drop means the shared CPU got busier)")
    print(f"Load average at end: {harness.machine_description().rsplit('load average ', 1)[1]}")
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
