"""Batched generation for both model families.

Prompts are sorted by length so each batch pads little, causal prompts are padded on the
left so every row's last prompt token sits at the same position, and results come back in
the caller's order. Only the new tokens are decoded. A batch that runs out of memory is
retried with half as many rows.

A batch contains at most ``batch_size`` prompts and, when ``batch_tokens`` is set, at most that
many prompt tokens counting padding. Short prompts then share larger batches: a decoding
step reads every weight once however many rows it serves, so on a CPU a step for 32 rows
costs about what a step for 16 rows costs.

Greedy batched output equals one-prompt-at-a-time output up to float rounding: padding
changes the matmul shapes, which can change the last bits of the logits, so two tokens
whose logits tie to within that rounding could be picked differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from loratune.config import GenerationSettings
from loratune.data.formatting import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class Generated:
    """One generated text with its token counts."""

    text: str
    prompt_tokens: int
    new_tokens: int


def generation_config(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Build an explicit ``GenerationConfig``; greedy unless sampling is switched on."""
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "do_sample": settings.do_sample,
        "repetition_penalty": settings.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return GenerationConfig(**kwargs)


def _pad_batch(rows: list[list[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids, mask = [], []
    for ids in rows:
        pad = [pad_id] * (width - len(ids))
        input_ids.append(pad + ids if left else ids + pad)
        ones, zeros = [1] * len(ids), [0] * len(pad)
        mask.append(zeros + ones if left else ones + zeros)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)}


def _new_token_ids(output: torch.Tensor, prompt_width: int, family: str, pad_id: int) -> list[list[int]]:
    # Causal outputs repeat the prompt first; seq2seq outputs start with the decoder start token.
    generated = output[:, prompt_width:] if family == "causal" else output[:, 1:]
    generated = generated.masked_fill(generated == IGNORE_INDEX, pad_id)
    return generated.tolist()


def _count_new_tokens(ids: list[int], eos_id: int | None, pad_id: int) -> int:
    count = 0
    for token in ids:
        if token == eos_id:
            return count + 1
        if token == pad_id and eos_id != pad_id:
            break
        count += 1
    return count


def is_out_of_memory(error: BaseException) -> bool:
    """Return True for a CUDA out-of-memory error or a failed CPU allocation."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _generate_chunk(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    family: str,
    config: GenerationConfig,
    device: torch.device,
) -> list[Generated]:
    batch = _pad_batch(rows, tokenizer.pad_token_id, left=family == "causal")
    batch = {key: value.to(device) for key, value in batch.items()}
    output = model.generate(**batch, generation_config=config)
    new_ids = _new_token_ids(output.cpu(), batch["input_ids"].shape[1], family, tokenizer.pad_token_id)
    results = []
    for prompt, ids in zip(rows, new_ids):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        count = _count_new_tokens(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        results.append(Generated(text, len(prompt), count))
    return results


def _batch_rows(longest: int, batch_size: int, batch_tokens: int | None) -> int:
    """Return how many prompts a batch takes when its longest prompt has ``longest`` tokens."""
    if batch_tokens is None:
        return batch_size
    return max(1, min(batch_size, batch_tokens // max(longest, 1)))


def plan_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """Split prompt indices into batches, longest prompts first, as ``generate`` forms them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, start = [], 0
    while start < len(order):
        rows = _batch_rows(lengths[order[start]], batch_size, batch_tokens)
        batches.append(order[start : start + rows])
        start += rows
    return batches


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    family: str,
    settings: GenerationSettings,
    progress: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Generate one text per prompt (token ids) in batches that ``plan_batches`` would form.

    When a batch runs out of memory, it is retried with half as many rows, and no later batch
    gets more, down to 1. Prompts are taken longest first, so that happens on the first batch
    if at all.
    """
    model.eval()
    config = generation_config(settings, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[Generated | None] = [None] * len(prompts)
    batch_size = settings.batch_size
    start = 0
    while start < len(order):
        rows = _batch_rows(len(prompts[order[start]]), batch_size, settings.batch_tokens)
        chunk = order[start : start + rows]
        try:
            outputs = _generate_chunk(model, tokenizer, [list(prompts[i]) for i in chunk], family, config, device)
        except RuntimeError as error:
            if len(chunk) == 1 or not is_out_of_memory(error):
                raise
            batch_size = max(1, len(chunk) // 2)
            logger.warning(
                "Out of memory generating %d examples at once; retrying with batch size %d (%s)",
                len(chunk), batch_size, str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for index, item in zip(chunk, outputs):
            results[index] = item
        start += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return [item for item in results if item is not None]
