"""Loss of LoRA training under bf16 autocast, with and without an fp32 LoRA branch.

    .venv/bin/python benchmarks/lora_precision.py [--steps 8]

Trains the SmolLM2 recipe three times on the same batches (same rows, same sampler seed):
fp32, bf16 autocast with PEFT's own LoRA forward (``train.fp32_lora_branch=false``), and bf16
autocast as loratune runs it by default, with each LoRA branch computed in fp32 and added to
the upcast output of the frozen layer. PEFT alone adds the LoRA output to the bf16 output of
the frozen layer in bf16, whose 8-bit mantissa rounds the small early updates away.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import train_throughput  # noqa: E402

VARIANTS = {
    # variant: (side of train_throughput that it runs, train.fp32_lora_branch)
    "fp32": ("loratune-fp32", True),
    "bf16 autocast, bf16 LoRA branch (PEFT)": ("loratune", False),
    "bf16 autocast, fp32 LoRA branch (default)": ("loratune", True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-source-length", type=int, default=256, help="shorter than the recipe, to run faster")
    parser.add_argument("--heldout", type=int, default=24, help="validation rows for the held-out loss")
    harness.add_process_arguments(parser, json_output=False)
    args = parser.parse_args(argv)
    if args.child:
        spec = harness.read_child_spec(args.child)
        train_throughput.run_side(spec)
        return 0

    source = harness.start_parent(args.threads)
    print()
    results = {}
    with tempfile.TemporaryDirectory(prefix="loratune-bench-precision-") as folder:
        for variant, (side, fp32_branch) in VARIANTS.items():
            config = train_throughput.side_config("smollm2-samsum.yaml", None, source, args.steps, 8, None, side, f"{folder}/run")
            config["data"]["max_source_length"] = args.max_source_length
            config["train"]["fp32_lora_branch"] = fp32_branch
            spec = {"side": side, "variant": variant, "config": config, "heldout": args.heldout, "threads": args.threads}
            results[variant] = harness.run_child(Path(__file__), spec, variant)

    reference = results["fp32"]
    rows = []
    for variant, result in results.items():
        gaps = [loss - base for loss, base in zip(result["losses"], reference["losses"])]
        rows.append([variant, result["loop_seconds"], f"{result['heldout_loss']:.4f}",
                     f"{result['heldout_loss'] - reference['heldout_loss']:+.4f}",
                     f"{sum(gaps) / len(gaps):+.4f}", f"{max(gaps, key=abs):+.4f}"])
    print(harness.format_table(
        ["variant", "training loop (s)", "held-out loss", "vs fp32", "mean step-loss gap", "largest step-loss gap"], rows))
    print("\nTraining loss per optimizer step (identical batches on every side):\n")
    curve = [[step + 1, *(f"{results[v]['losses'][step]:.4f}" for v in results)] for step in range(args.steps)]
    print(harness.format_table(["step", *results], curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
