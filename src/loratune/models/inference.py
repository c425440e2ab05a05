"""Load a model for generation from a run folder or from a plain base model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loratune.config import DataConfig, ModelConfig
from loratune.data.formatting import PromptFormat
from loratune.models.loading import check_adapter_matches_base, load_model, load_tokenizer, warn_if_pickled_adapter
from loratune.runs import ADAPTER_DIR, INFO_FILE, RunInfo, is_run_dir, load_run_info

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


# Key in loratune.json of a folder written by ``loratune merge``; its value records the merge.
MERGED_KEY = "merged"


def read_merge_record(folder: Path) -> dict | None:
    """Return the merge record of a merged model folder, or None for any other folder."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8")).get(MERGED_KEY)
    return record if isinstance(record, dict) else None


def load_merged_for_inference(folder: Path, dtype: torch.dtype = torch.float32) -> InferenceModel:
    """Load a merged folder as a plain model that keeps the prompt format of its run."""
    folder = Path(folder)
    info = load_run_info(folder)
    config = ModelConfig(name_or_path=str(folder), family=info.family, trust_remote_code=info.trust_remote_code)
    loaded = load_model(config, dtype=dtype)
    loaded.model.eval()
    fmt = PromptFormat(**info.prompt)
    return InferenceModel(loaded.model, loaded.tokenizer, info.family, fmt, info.max_source_length, str(folder), None)


def load_run_for_inference(run_dir: Path, dtype: torch.dtype = torch.float32, merge: bool = True) -> InferenceModel:
    """Load a run's base model in full precision with its adapter on top.

    With ``merge`` (the default) the adapter is added into the base weights in memory, so
    generation runs the plain model. Unmerged, every adapted layer adds two small matmuls,
    a scaling and a sum at each decoding step, and on a CPU those small operations take a
    large share of the step. With ``merge=False`` the model stays a ``PeftModel``.

    A folder written by ``loratune merge`` is loaded as it is, since the adapter is already
    part of its weights.
    """
    run_dir = Path(run_dir)
    if read_merge_record(run_dir) is not None:
        return load_merged_for_inference(run_dir, dtype)
    info = load_run_info(run_dir)
    adapter_dir = run_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained adapter in {adapter_dir}; did training finish?")
    warn_if_pickled_adapter(adapter_dir)
    loaded = load_model(model_config_from_run(info), dtype=dtype)
    check_adapter_matches_base(adapter_dir, loaded.model, info.base_model)
    tokenizer = load_tokenizer(str(adapter_dir), model_config_from_run(info))
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
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
