"""Resolve what ``predict`` and ``serve`` run: a run folder, a merged folder or a base model.

Prompts and decoding settings come from the same places as in ``loratune evaluate``. A run
folder (or a folder written by ``loratune merge``) brings its own prompt format, max input
length and ``config.yaml``. A base model takes them from ``--config`` and the overrides.
"""

from __future__ import annotations

from pathlib import Path

from loratune.config import RunConfig, load_config
from loratune.models.inference import (
    InferenceModel,
    load_base_for_inference,
    load_for_inference,
    read_merge_record,
)
from loratune.runs import CONFIG_FILE, is_run_dir


def target_config(target: str, config_path: str | None, overrides: list[str]) -> RunConfig:
    """Return the recipe that goes with ``target``: ``--config``, else the run's, else defaults."""
    if config_path:
        config = load_config(config_path, overrides)
    elif (Path(target) / CONFIG_FILE).is_file():
        config = load_config(Path(target) / CONFIG_FILE, overrides)
    else:
        config = load_config(None, overrides)
    if not is_run_dir(Path(target)):
        config = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": target})})
    return config


def load_target(target: str, config: RunConfig) -> InferenceModel:
    """Load a run folder (base + adapter), a merged folder, or a base model for generation."""
    if is_run_dir(Path(target)):
        return load_for_inference(target)
    return load_base_for_inference(config.model, config.data.prompt, config.data.max_source_length)


def describe_target(target: str, loaded: InferenceModel) -> dict:
    """Describe the loaded model for logs and ``GET /v1/models``."""
    merge = read_merge_record(Path(target)) if is_run_dir(Path(target)) else None
    if merge is not None:
        source = "merged folder"
    elif loaded.adapter is not None:
        source = "run folder, adapter merged in memory"
    else:
        source = "base model"
    return {
        "base_model": merge["base_model"] if merge else loaded.base_model,
        "adapter": merge["adapter"] if merge else loaded.adapter,
        "merged": merge is not None or loaded.adapter is not None,
        "loaded_from": source,
        "family": loaded.family,
        "prompt_format": loaded.prompt.to_dict(),
        "max_source_length": loaded.max_source_length,
    }
