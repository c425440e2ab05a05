"""Load a model for generation from a run folder or from a plain base model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loratune.config import DataConfig, ModelConfig
from loratune.data.formatting import PromptFormat
from loratune.models.loading import load_model, load_tokenizer
from loratune.runs import ADAPTER_DIR, RunInfo, is_run_dir, load_run_info

logger = logging.getLogger(__name__)


@dataclass
class InferenceModel:
    """A model ready for ``generate`` with everything needed to build its prompts."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str
    prompt: PromptFormat
    max_source_length: int | None
    base_model: str
    adapter: str | None


def model_config_from_run(info: RunInfo) -> ModelConfig:
    return ModelConfig(
        name_or_path=info.base_model,
        gguf_file=info.gguf_file,
        family=info.family,
        revision=info.revision,
        trust_remote_code=info.trust_remote_code,
    )


def load_run_for_inference(run_dir: Path, dtype: torch.dtype = torch.float32) -> InferenceModel:
    """Load a run's base model in full precision with its adapter on top."""
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    adapter_dir = run_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained adapter in {adapter_dir}; did training finish?")
    loaded = load_model(model_config_from_run(info), dtype=dtype)
    tokenizer = load_tokenizer(str(adapter_dir), model_config_from_run(info))
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    model.eval()
    fmt = PromptFormat(**info.prompt)
    return InferenceModel(
        model, tokenizer, info.family, fmt, info.max_source_length, info.base_model, str(adapter_dir)
    )


def load_base_for_inference(
    config: ModelConfig, template: str, max_source_length: int | None, dtype: torch.dtype = torch.float32
) -> InferenceModel:
    """Load a base model without an adapter (the zero-shot baseline)."""
    loaded = load_model(config, dtype=dtype)
    loaded.model.eval()
    fmt = PromptFormat.for_tokenizer(loaded.family, template, loaded.tokenizer)
    return InferenceModel(
        loaded.model, loaded.tokenizer, loaded.family, fmt, max_source_length, loaded.reference, None
    )


def load_for_inference(path_or_model: str, config: ModelConfig | None = None, template: str | None = None) -> InferenceModel:
    """Load a run folder (base + adapter) or, for anything else, a base model."""
    if is_run_dir(Path(path_or_model)):
        return load_run_for_inference(Path(path_or_model))
    base = (config or ModelConfig()).model_copy(update={"name_or_path": path_or_model})
    return load_base_for_inference(base, template or DataConfig().prompt, None)
