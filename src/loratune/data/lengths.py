"""Token length statistics and max lengths chosen from the data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from loratune.data.formatting import PromptFormat, encode_prompt, encode_target
from loratune.data.loading import Example

STAT_PERCENTILES = (50, 90, 95)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Return count, mean, p50, p90, p95 and max of ``lengths``."""
    values = np.asarray(lengths, dtype=np.int64)
    stats = {"count": int(values.size), "mean": round(float(values.mean()), 1)}
    for percentile in STAT_PERCENTILES:
        stats[f"p{percentile}"] = int(np.percentile(values, percentile, method="higher"))
    stats["max"] = int(values.max())
    return stats


def percentile_length(lengths: Sequence[int], percentile: float) -> int:
    """Return the smallest length that covers ``percentile`` % of ``lengths``."""
    return int(math.ceil(np.percentile(np.asarray(lengths), percentile, method="higher")))


def measure_lengths(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat
) -> tuple[list[int], list[int]]:
    """Return untruncated prompt and target token counts for ``examples``."""
    sources = [len(encode_prompt(tokenizer, fmt, ex.text, None)[0]) for ex in examples]
    targets = [len(encode_target(tokenizer, fmt, ex.target, None)[0]) for ex in examples]
    return sources, targets


def choose_max_lengths(
    source_lengths: Sequence[int],
    target_lengths: Sequence[int],
    source_percentile: float,
    target_percentile: float,
    fixed_source: int | None,
    fixed_target: int | None,
    model_max: int | None,
) -> tuple[int, int]:
    """Pick max source and target lengths: the configured value, else the percentile.

    The result never exceeds the model's own maximum (``model_max``) when it is known.
    """
    source = fixed_source or percentile_length(source_lengths, source_percentile)
    target = fixed_target or percentile_length(target_lengths, target_percentile)
    if model_max:
        source = min(source, model_max)
        target = min(target, model_max)
    return source, target


def format_stats_table(source: dict, target: dict) -> str:
    """Format input and target statistics as a small text table."""
    keys = ["count", "mean", "p50", "p90", "p95", "max"]
    header = f"{'tokens':<8}" + "".join(f"{key:>8}" for key in keys)
    rows = [header]
    for name, stats in (("input", source), ("target", target)):
        rows.append(f"{name:<8}" + "".join(f"{stats[key]:>8}" for key in keys))
    return "\n".join(rows)
