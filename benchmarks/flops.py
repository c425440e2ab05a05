"""Useful training FLOPs of a LoRA model, counted from its layers and the real tokens.

For each linear layer with P = in_features x out_features weights, applied to n tokens:

- frozen weight: 4 P n (2 P n forward, 2 P n for the gradient with respect to its input).
  A frozen weight needs no weight gradient, so the usual 6 P n overcounts LoRA training.
- trainable weight (LoRA A and B): 6 P n (forward, input gradient and weight gradient).

Attention scores and the weighted sum cost 4 d_attn FLOPs per query per visible key in each
layer, forward; training counts 3 times that (the backward pass has two matmuls per forward
matmul). Only real tokens count: causal attention sees L (L + 1) / 2 query-key pairs, T5's
encoder S^2, its decoder T (T + 1) / 2 plus T S for cross-attention. The output layer counts
for label tokens only, because only they contribute to the loss.

Token streams: a causal model runs every layer on its L = prompt + target tokens. T5 runs
the encoder on the S source tokens, the decoder on the T target tokens, and each decoder
layer's cross-attention key and value projections on the S encoder outputs.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def _stream(name: str, family: str) -> str:
    """Return the token stream a linear layer runs on: 'input', 'source', 'target' or 'label'."""
    if name.endswith("lm_head") or ".lm_head." in name:
        return "label"
    if family == "causal":
        return "input"
    if ".encoder." in f".{name}":
        return "source"
    if ".EncDecAttention.k" in name or ".EncDecAttention.v" in name:
        return "source"
    return "target"


def linear_weights(model: nn.Module, family: str) -> dict[tuple[str, bool], int]:
    """Sum linear weight counts per (token stream, trainable)."""
    totals: dict[tuple[str, bool], int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = (_stream(name, family), module.weight.requires_grad)
            totals[key] += module.in_features * module.out_features
    return dict(totals)


def attention_shape(config) -> tuple[int, int, int]:
    """Return (encoder or decoder-only layers, decoder layers, attention width) of a config."""
    if getattr(config, "is_encoder_decoder", False):
        width = config.num_heads * config.d_kv
        return config.num_layers, config.num_decoder_layers, width
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, 0, config.num_attention_heads * head_dim


def linear_flops(weights: dict[tuple[str, bool], int], tokens: dict[str, int]) -> int:
    """Training FLOPs of the linear layers for the given token count of each stream."""
    total = 0
    for (stream, trainable), count in weights.items():
        total += (6 if trainable else 4) * count * tokens[stream]
    return total


def attention_flops(config, family: str, source: int, target: int) -> int:
    """Training FLOPs of attention scores and weighted sums for one example."""
    layers, decoder_layers, width = attention_shape(config)
    if family == "causal":
        pairs = layers * source * (source + 1) // 2
    else:
        pairs = layers * source * source + decoder_layers * (target * (target + 1) // 2 + target * source)
    return 3 * 4 * width * pairs


def example_flops(weights, config, family: str, source: int, target: int) -> int:
    """Useful training FLOPs for one example.

    ``source``: causal prompt + target tokens, or T5 encoder tokens. ``target``: label tokens.
    """
    if family == "causal":
        tokens = {"input": source, "label": target}
    else:
        tokens = {"source": source, "target": target, "label": target}
    return linear_flops(weights, tokens) + attention_flops(config, family, source, target)


def useful_flops(model: nn.Module, family: str, lengths: list[tuple[int, int]]) -> int:
    """Useful training FLOPs for one pass over examples of (source, target) lengths."""
    weights = linear_weights(model, family)
    config = model.config
    return sum(example_flops(weights, config, family, source, target) for source, target in lengths)
