"""Tokenize the training splits and pick max lengths from the data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerBase

from loratune.config import DataConfig
from loratune.data.formatting import PromptFormat, build_training_features
from loratune.data.lengths import choose_max_lengths, format_stats_table, length_stats, measure_lengths
from loratune.data.loading import Example, load_split

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Tokenized splits plus the statistics that were used to build them."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    max_source_length: int
    max_target_length: int
    stats: dict = field(default_factory=dict)


def model_max_length(tokenizer: PreTrainedTokenizerBase, model_config) -> int | None:
    """Return the longest sequence the model accepts, when it states one."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel value (int(1e30)).
    return value if isinstance(value, int) and value < 1_000_000 else None


def tokenize_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    max_source: int,
    max_target: int,
) -> tuple[datasets.Dataset, dict]:
    """Tokenize examples into a ``datasets.Dataset``; count truncated inputs and targets."""
    rows, cut_sources, cut_targets = [], 0, 0
    for example in examples:
        features, source_cut, target_cut = build_training_features(
            tokenizer, fmt, example.text, example.target, max_source, max_target
        )
        rows.append(features)
        cut_sources += source_cut
        cut_targets += target_cut
    counts = {"inputs_truncated": cut_sources, "targets_truncated": cut_targets}
    return datasets.Dataset.from_list(rows), counts


def prepare_training_data(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    model_max: int | None,
    with_validation: bool,
) -> PreparedData:
    """Load, clean, measure and tokenize the train (and validation) splits."""
    train_examples, train_report = load_split(config, config.train_split, config.max_train_samples)
    source_lengths, target_lengths = measure_lengths(train_examples, tokenizer, fmt)
    source_stats, target_stats = length_stats(source_lengths), length_stats(target_lengths)
    logger.info("Token lengths of the train split:\n%s", format_stats_table(source_stats, target_stats))
    max_source, max_target = choose_max_lengths(
        source_lengths,
        target_lengths,
        config.source_length_percentile,
        config.target_length_percentile,
        config.max_source_length,
        config.max_target_length,
        model_max,
    )
    logger.info("Max lengths: input %d tokens, target %d tokens", max_source, max_target)

    train, train_cuts = tokenize_examples(train_examples, tokenizer, fmt, max_source, max_target)
    _log_truncation("train", train_cuts, len(train_examples), max_source, max_target)
    stats = {
        "splits": {"train": train_report.summary()},
        "train_lengths": {"input": source_stats, "target": target_stats},
        "max_source_length": max_source,
        "max_target_length": max_target,
        "train_truncation": train_cuts,
    }
    validation = None
    if with_validation and config.validation_split:
        val_examples, val_report = load_split(config, config.validation_split, config.max_eval_samples)
        validation, val_cuts = tokenize_examples(val_examples, tokenizer, fmt, max_source, max_target)
        stats["splits"]["validation"] = val_report.summary()
        stats["validation_truncation"] = val_cuts
    return PreparedData(train, validation, max_source, max_target, stats)


def _log_truncation(split: str, cuts: dict, total: int, max_source: int, max_target: int) -> None:
    if cuts["inputs_truncated"] or cuts["targets_truncated"]:
        logger.info(
            "%s: %d of %d inputs cut to %d tokens, %d targets cut to %d tokens",
            split, cuts["inputs_truncated"], total, max_source, cuts["targets_truncated"], max_target,
        )
