"""Pad share of one full SAMSum training epoch under each batching scheme (no model is run).

    .venv/bin/python benchmarks/padding.py [--batch-size 8]

Tokenizes the whole train split as the SmolLM2 recipe does (configs/smollm2-samsum.yaml).
For each scheme it reports the share of positions fed to the model that are padding. The
training benchmark's short runs cannot show this for a full epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def batches_of(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


def padded_positions(batches: list[list[int]], lengths: list[int], packed: bool = False) -> int:
    """Positions fed to the model: each batch is as wide as its longest example."""
    from loratune.train.packing import pack_rows

    total = 0
    for batch in batches:
        width = max(lengths[i] for i in batch)
        rows = len(pack_rows([lengths[i] for i in batch], width)) if packed else len(batch)
        total += rows * width
    return total


def main(argv: list[str] | None = None) -> int:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from loratune.config import build_config
    from loratune.data.formatting import PromptFormat
    from loratune.data.lengths import measure_lengths
    from loratune.data.loading import load_split
    from loratune.models.loading import load_tokenizer, resolve_model_path
    from loratune.train.packing import ShuffledLengthGroupedSampler

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    recipe = yaml.safe_load((harness.CONFIGS / "smollm2-samsum.yaml").read_text())
    recipe["data"].update(source=harness.samsum_source(), max_train_samples=None)
    config = build_config(recipe)
    tokenizer = load_tokenizer(resolve_model_path(config.model), config.model)
    fmt = PromptFormat.for_tokenizer("causal", config.data.prompt, tokenizer)
    examples, _ = load_split(config.data, "train", None)
    sources, targets = measure_lengths(examples, tokenizer, fmt)
    max_source, max_target = config.data.max_source_length, config.data.max_target_length
    lengths = [min(s, max_source) + min(t, max_target) for s, t in zip(sources, targets)]
    real = sum(lengths)

    generator = torch.Generator().manual_seed(0)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()
    schemes = {
        f"fixed width {max_source + max_target} (reference recipe)": len(lengths) * (max_source + max_target),
        "dynamic padding, random batches": padded_positions(batches_of(random_order, args.batch_size), lengths),
        "packing, random batches": padded_positions(batches_of(random_order, args.batch_size), lengths, packed=True),
    }
    for name, sampler_class in (("transformers LengthGroupedSampler", LengthGroupedSampler),
                                ("loratune length grouping (default)", ShuffledLengthGroupedSampler)):
        order = list(sampler_class(args.batch_size, lengths=lengths, generator=generator))
        schemes[f"dynamic padding, {name}"] = padded_positions(batches_of(order, args.batch_size), lengths)
        if sampler_class is ShuffledLengthGroupedSampler:
            schemes["packing, loratune length grouping"] = padded_positions(
                batches_of(order, args.batch_size), lengths, packed=True
            )

    print(f"{len(lengths)} training examples, {real:,} real tokens, batch size {args.batch_size}, "
          f"max lengths {max_source}/{max_target}\n")
    rows = [[name, f"{fed:,}", f"{1 - real / fed:.1%}", f"{fed / real:.2f}"] for name, fed in schemes.items()]
    print(harness.format_table(["batching", "positions fed", "pad share", "positions per real token"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
