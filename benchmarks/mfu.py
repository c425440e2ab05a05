"""Model FLOPs utilization of loratune training in fp32 and bf16, with the peak measured here.

    .venv/bin/python benchmarks/mfu.py [--model smollm2|t5-tiny|t5-small] [--steps 6]

MFU = useful training FLOPs per second / peak matmul rate. benchmarks/flops.py counts the
useful FLOPs from the model's linear layers and the real tokens. It counts 4 FLOPs per frozen
weight and token, 6 per trainable LoRA weight and token, attention over real query-key pairs,
and the output layer on label tokens only. The peak is the best rate of torch matmuls in the
same precision, measured in this run: a 2048 x 2048 x 2048 square and the shapes of
SmolLM2's own layers. The script also checks the linear-layer part of the formula against
torch's FlopCounterMode on one training example.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import train_throughput  # noqa: E402

SIDES = ["loratune-fp32", "loratune"]
# Ops that only move or convert data; under autocast they include every cast to bf16.
COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone")


def flop_check(spec: dict) -> None:
    """Count one example's training FLOPs with FlopCounterMode and with the formula (child process)."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    import flops
    from loratune.config import build_config
    from loratune.data.formatting import IGNORE_INDEX, PromptFormat, build_training_features
    from loratune.data.loading import load_split
    from loratune.models.loading import load_model
    from loratune.models.lora import build_lora_config

    config = build_config(spec["config"])
    loaded = load_model(config.model)
    model = get_peft_model(loaded.model, build_lora_config(config.lora, loaded.model, loaded.family))
    fmt = PromptFormat.for_tokenizer(loaded.family, config.data.prompt, loaded.tokenizer)
    example = load_split(config.data, "train", 1)[0][0]
    features, _, _ = build_training_features(loaded.tokenizer, fmt, example.text, example.target,
                                             config.data.max_source_length, config.data.max_target_length)
    input_ids = torch.tensor([features["input_ids"]])
    targets = torch.tensor([features["labels"]])[:, 1:]
    mask = targets != IGNORE_INDEX
    with FlopCounterMode(display=False) as counter:
        # The same computation as LoraTrainer.compute_loss: output layer on label positions only.
        hidden = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1,
                       use_cache=False).hidden_states[-1][:, :-1]
        logits = model.get_output_embeddings()(hidden[mask])
        F.cross_entropy(logits, targets[mask]).backward()
    weights = flops.linear_weights(model, loaded.family)
    source, target = len(features["input_ids"]), int(mask.sum())
    harness.write_result(spec, {
        "counted": counter.get_total_flops(),
        "formula_linear": flops.linear_flops(weights, {"input": source, "label": target}),
        "formula_attention": flops.attention_flops(model.config, loaded.family, source, target),
        "tokens": source,
        "label_tokens": target,
    })


def profile_step(spec: dict) -> None:
    """Profile one forward and backward pass of 8 training rows; split CPU time by op kind (child)."""
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments

    from loratune.config import build_config
    from loratune.data.formatting import PromptFormat, build_training_features
    from loratune.data.loading import load_split
    from loratune.models.loading import load_model
    from loratune.models.lora import build_lora_config
    from loratune.train.trainer import LoraTrainer, PadCollator

    config = build_config(spec["config"])
    loaded = load_model(config.model)
    model = get_peft_model(loaded.model, build_lora_config(config.lora, loaded.model, loaded.family))
    fmt = PromptFormat.for_tokenizer(loaded.family, config.data.prompt, loaded.tokenizer)
    examples = load_split(config.data, "train", 8)[0]
    features = [build_training_features(loaded.tokenizer, fmt, ex.text, ex.target, config.data.max_source_length,
                                        config.data.max_target_length)[0] for ex in examples]
    batch = PadCollator(loaded.tokenizer.pad_token_id)(features)
    args = TrainingArguments(output_dir=spec["work_dir"], use_cpu=True, report_to="none")
    trainer = LoraTrainer(model=model, args=args, family=loaded.family)
    bf16 = spec["precision"] == "bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, batch)
        loss.backward()

    step()  # warm-up
    with torch.profiler.profile() as profiler:
        step()
    kinds = {"matmul": 0.0, "attention": 0.0, "copy": 0.0, "other": 0.0}
    for event in profiler.key_averages():
        name = event.key
        if name in ("aten::mm", "aten::addmm", "aten::bmm"):
            kinds["matmul"] += event.self_cpu_time_total
        elif "scaled_dot_product" in name:
            kinds["attention"] += event.self_cpu_time_total
        elif name in COPY_OPS:
            kinds["copy"] += event.self_cpu_time_total
        else:
            kinds["other"] += event.self_cpu_time_total
    total = sum(kinds.values())
    harness.write_result(spec, {kind: value / total for kind, value in kinds.items()} | {"seconds": total / 1e6})


def check_line(check: dict) -> str:
    """Describe the FlopCounterMode count against the formula."""
    return (
        f"\nFlopCounterMode on one example ({check['tokens']} tokens, {check['label_tokens']} label tokens): "
        f"{check['counted'] / 1e9:.2f} GFLOP counted; the formula's linear part gives "
        f"{check['formula_linear'] / 1e9:.2f} GFLOP ({check['counted'] / check['formula_linear'] - 1:+.1%}), "
        f"and its attention part adds {check['formula_attention'] / 1e9:.2f} GFLOP, which FlopCounterMode "
        "does not count for the CPU attention kernel."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", *harness.T5_SHAPES], default="smollm2")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per precision")
    parser.add_argument("--batch-size", type=int, default=8)
    harness.add_process_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        spec = harness.read_child_spec(args.child)
        if spec["side"] == "flop-check":
            flop_check(spec)
        elif spec["side"] == "profile":
            profile_step(spec)
        else:
            train_throughput.run_side(spec)
        return 0

    source = harness.start_parent(args.threads)
    print()
    recipe, _ = train_throughput.MODELS[args.model]

    # Matmul rates of the shapes that harness.peak_matmul_gflops takes the best of.
    rows, peaks = [], {"fp32": 0.0, "bf16": 0.0}
    for m, k, n in harness.PEAK_SHAPES:
        rates = {dtype: harness.matmul_gflops(dtype, m, k, n) for dtype in ("fp32", "bf16")}
        peaks = {dtype: max(peaks[dtype], rates[dtype]) for dtype in peaks}
        rows.append([f"{m}x{k} @ {k}x{n}", rates["fp32"], rates["bf16"], f"{rates['bf16'] / rates['fp32']:.2f}x"])
    print("Matmul rate (GFLOP/s, best of repeated runs); the peak is the best of each column:\n")
    print(harness.format_table(["matmul", "fp32", "bf16", "bf16 / fp32"], rows) + "\n")

    results, check = {}, None
    with tempfile.TemporaryDirectory(prefix="loratune-bench-mfu-") as folder:
        model_path, lengths = train_throughput.benchmark_model(
            args.model, source, Path(folder), args.steps * args.batch_size)
        for side in SIDES:
            config = train_throughput.side_config(
                recipe, model_path, source, args.steps, args.batch_size, lengths, side, f"{folder}/run")
            spec = {"side": side, "config": config, "heldout": 1, "threads": args.threads}
            results[side] = harness.run_child(Path(__file__), spec, f"{args.model} {side}")
        config = train_throughput.side_config(recipe, model_path, source, 1, 1, lengths, "loratune-fp32", f"{folder}/check")
        if model_path is None:  # the check follows the causal loss; the T5 models skip it
            spec = {"side": "flop-check", "config": config, "threads": args.threads}
            check = harness.run_child(Path(__file__), spec, "FlopCounterMode check")
        profiles = {}
        for precision in ("fp32", "bf16"):
            spec = {"side": "profile", "precision": precision, "config": config, "threads": args.threads}
            profiles[precision] = harness.run_child(Path(__file__), spec, f"profile {precision}")

    table = []
    for side, result in results.items():
        seconds = result["loop_seconds"]
        achieved = result["useful_flops"] / seconds / 1e9
        peak = peaks[result["precision"]]
        table.append([side, result["precision"], result["useful_flops"] / 1e12, seconds, achieved, peak, f"{achieved / peak:.1%}"])
    print(harness.format_table(
        ["side", "precision", "useful TFLOP", "training loop (s)", "achieved GFLOP/s", "peak GFLOP/s", "MFU"], table))
    if check:
        print(check_line(check))
    print("\nSelf CPU time of one training step on the first 8 training rows, by op kind (torch.profiler):\n")
    print(harness.format_table(
        ["precision", "step (s)", "matmul (mm, addmm, bmm)", "attention kernel", "copies and casts", "everything else"],
        [[p, r["seconds"], *(f"{r[kind]:.0%}" for kind in ("matmul", "attention", "copy", "other"))]
         for p, r in profiles.items()],
    ))
    end = {dtype: harness.peak_matmul_gflops(dtype) for dtype in ("fp32", "bf16")}
    print(f"Peak matmul at end: fp32 {end['fp32']:.0f} GFLOP/s, bf16 {end['bf16']:.0f} GFLOP/s; "
          f"load average at end: {harness.machine_description().rsplit('load average ', 1)[1]}")
    if args.json:
        args.json.write_text(json.dumps(
            {"peaks": peaks, "end_peaks": end, "results": results, "check": check, "profiles": profiles}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
