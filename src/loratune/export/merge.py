"""Merge a run's LoRA adapter into its base model and save a standalone model folder.

The merged folder is a plain transformers model (``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer) that any transformers-compatible tool can load.
It also keeps the run's ``loratune.json`` and ``config.yaml``, so ``loratune predict``,
``serve`` and ``evaluate`` build prompts for it exactly as they do for the run folder.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

import loratune
from loratune.config import GenerationSettings, load_config
from loratune.models.inference import MERGED_KEY, load_run_for_inference, read_merge_record
from loratune.runs import ADAPTER_DIR, CONFIG_FILE, INFO_FILE, load_run_info, use_plain_file_modes, write_json_atomic

logger = logging.getLogger(__name__)


class MergeError(RuntimeError):
    """Raised when the output folder of a merge is not empty and overwriting was not allowed."""


def check_merge_output(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Reject an output folder that is the run itself, lies inside it, or contains other files."""
    run_resolved, out_resolved = run_dir.resolve(), out_dir.resolve()
    if out_resolved == run_resolved or run_resolved in out_resolved.parents:
        raise MergeError(f"--out {out_dir} is inside the run folder {run_dir}; choose a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"--out {out_dir} is not empty; pass --overwrite to replace it or choose another folder")


def merged_generation_settings(run_dir: Path) -> GenerationSettings:
    """Return the run's decoding settings, or the defaults when it has no ``config.yaml``."""
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        return load_config(config_path).generation
    return GenerationSettings()


def merge_run(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path | None:
    """Merge the adapter of ``run_dir`` into a float32 copy of its base and save it to ``out_dir``.

    Returns ``out_dir``, or None when ``run_dir`` is already a merged folder (nothing is written).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if read_merge_record(run_dir) is not None:
        logger.debug("%s is already a merged model; nothing to merge", run_dir)
        return None
    info = load_run_info(run_dir)
    check_merge_output(run_dir, out_dir, overwrite)

    # The base is always loaded unquantized: adding B @ A to 8-bit or 4-bit weights would round
    # most of the LoRA update away.
    if info.quantization != "none":
        logger.warning(
            "The adapter was trained on a %s-quantized base; merging it into the unquantized "
            "float32 base %s instead, because merging into quantized weights loses quality.",
            info.quantization, info.base_model,
        )
    logger.info("Merging %s into %s", run_dir / ADAPTER_DIR, info.base_model)
    loaded = load_run_for_inference(run_dir, dtype=torch.float32, merge=True)
    merged = loaded.model

    # Store the run's decoding settings as the model's defaults, so tools that read
    # generation_config.json (transformers pipelines, vLLM) decode as loratune evaluated.
    settings = merged_generation_settings(run_dir)
    merged.generation_config.update(
        max_new_tokens=settings.max_new_tokens,
        num_beams=settings.num_beams,
        do_sample=settings.do_sample,
        repetition_penalty=settings.repetition_penalty,
        pad_token_id=loaded.tokenizer.pad_token_id,
        eos_token_id=loaded.tokenizer.eos_token_id,
    )

    # Write everything into a temporary sibling and rename it at the end, so an interrupted
    # merge never leaves a folder that looks complete.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    merged.save_pretrained(tmp_dir)
    loaded.tokenizer.save_pretrained(tmp_dir)
    use_plain_file_modes(tmp_dir)
    if (run_dir / CONFIG_FILE).is_file():
        shutil.copy2(run_dir / CONFIG_FILE, tmp_dir / CONFIG_FILE)
    record = {
        "run_dir": str(run_dir.resolve()),
        "adapter": str((run_dir / ADAPTER_DIR).resolve()),
        "base_model": info.base_model,
        "base_quantization": info.quantization,
        "dtype": "float32",
        "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    merged_info = replace(info, quantization="none", loratune_version=loratune.__version__)
    write_json_atomic(tmp_dir / INFO_FILE, {**asdict(merged_info), MERGED_KEY: record})

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.rename(out_dir)
    logger.info("Saved the merged model to %s", out_dir)
    return out_dir
