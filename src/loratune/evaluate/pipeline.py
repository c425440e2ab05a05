"""Evaluate a run folder (base + adapter) or a base model on one data split."""

from __future__ import annotations

import logging
from pathlib import Path

from loratune.config import RunConfig, load_config
from loratune.data.loading import load_split
from loratune.evaluate.runner import evaluate_examples
from loratune.models.inference import InferenceModel, load_base_for_inference, load_run_for_inference
from loratune.runs import CONFIG_FILE, EVAL_DIR, is_run_dir, load_run_info

logger = logging.getLogger(__name__)


def run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """Load the resolved config saved in a run folder, with optional overrides."""
    return load_config(Path(run_dir) / CONFIG_FILE, overrides)


def evaluate_run(
    run_dir: Path,
    config: RunConfig,
    split: str,
    out_dir: Path | None = None,
    with_base: bool = False,
) -> dict[str, dict]:
    """Score a trained run, and optionally its base model on the same examples.

    Returns metrics keyed by "tuned" and, with ``with_base``, "base".
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / EVAL_DIR / split
    examples, _ = load_split(config.data, split, config.eval.max_samples)
    results = {}
    if with_base:
        info = load_run_info(run_dir)
        base = load_base_for_inference(config.model, config.data.prompt, info.max_source_length)
        results["base"] = _score(base, examples, config, out_dir / "base", split)
        del base
    tuned = load_run_for_inference(run_dir)
    results["tuned"] = _score(tuned, examples, config, out_dir / "tuned" if with_base else out_dir, split)
    return results


def evaluate_base(config: RunConfig, split: str, out_dir: Path) -> dict:
    """Score the base model named in ``config.model`` without any adapter."""
    examples, _ = load_split(config.data, split, config.eval.max_samples)
    base = load_base_for_inference(config.model, config.data.prompt, config.data.max_source_length)
    return _score(base, examples, config, Path(out_dir), split)


def _score(loaded: InferenceModel, examples, config: RunConfig, out_dir: Path, split: str) -> dict:
    return evaluate_examples(loaded, examples, config.generation, out_dir, split, config.data.source)


def is_run(target: str) -> bool:
    return is_run_dir(Path(target))
