"""Attach a PEFT LoRA adapter to a base model."""

from __future__ import annotations

import logging
import types

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from loratune.config import LoraSettings

logger = logging.getLogger(__name__)

# Default targets by model type: the attention query/value projections for T5 (the original
# LoRA setup), and every attention projection for Llama-like decoders.
_TARGETS_BY_MODEL_TYPE = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "pegasus": ["q_proj", "v_proj"],
}
_ATTENTION_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def linear_module_names(model: nn.Module) -> set[str]:
    """Return the last name component of every ``nn.Linear`` in ``model``."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """Pick LoRA target modules from the architecture."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in _TARGETS_BY_MODEL_TYPE:
        return list(_TARGETS_BY_MODEL_TYPE[model_type])
    names = linear_module_names(model)
    attention = [name for name in _ATTENTION_NAMES if name in names]
    if attention:
        return attention
    raise ValueError(
        f"cannot pick LoRA target modules for model type {model_type!r}; set lora.target_modules "
        f"to a list of linear layer names (this model has: {sorted(names)}) or 'all-linear'"
    )


def build_lora_config(settings: LoraSettings, model: PreTrainedModel, family: str) -> LoraConfig:
    """Translate loratune's LoRA settings into a ``peft.LoraConfig``."""
    if settings.target_modules == "auto":
        targets: list[str] | str = default_target_modules(model)
    elif settings.target_modules == "all-linear":
        targets = "all-linear"
    else:
        targets = list(settings.target_modules)
        missing = sorted(set(targets) - linear_module_names(model))
        if missing:
            raise ValueError(
                f"lora.target_modules: {missing} not found among the model's linear layers "
                f"{sorted(linear_module_names(model))}"
            )
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        target_modules=targets,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        task_type=TaskType.SEQ_2_SEQ_LM if family == "seq2seq" else TaskType.CAUSAL_LM,
    )


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def attach_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    family: str,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter; every base weight stays frozen."""
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    lora_config = build_lora_config(settings, model, family)
    peft_model = get_peft_model(model, lora_config)
    trainable, total = parameter_counts(peft_model)
    logger.info(
        "LoRA targets %s: %s trainable of %s parameters (%.3f%%)",
        lora_config.target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return peft_model


def _upcast_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _fp32_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def keep_lora_branch_fp32(model: nn.Module) -> int:
    """Compute LoRA branches in fp32 under autocast and add them to an fp32 base output.

    Under bf16 or fp16 autocast, PEFT adds the LoRA output to the frozen layer's half-precision
    output in half precision. bf16 keeps 8 mantissa bits, so while the adapter is young its
    contribution, well under 1% of the base output, is mostly rounded away and training lags
    the fp32 run. Here the frozen matmul still runs in half precision, but its output is cast
    to fp32 before the LoRA branch, itself computed in fp32, is added. The weights and the saved
    adapter do not change. Returns the number of LoRA layers changed.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        module.base_layer.register_forward_hook(_upcast_output)
        for linear in [*module.lora_A.values(), *module.lora_B.values()]:
            linear.forward = types.MethodType(_fp32_linear_forward, linear)
        count += 1
    return count
