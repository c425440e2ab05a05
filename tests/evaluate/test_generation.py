"""Batched generation: same greedy text as one prompt at a time, caller order, OOM fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from loratune.config import DataConfig, GenerationSettings
from loratune.data.formatting import PromptFormat, encode_prompt
from loratune.data.loading import load_split
from loratune.evaluate.generation import generate

FAMILIES = [("tiny_llama_dir", "causal"), ("tiny_llama_plain_dir", "causal"), ("tiny_t5_dir", "seq2seq")]


def load(model_dir, family: str):
    model_class = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def demo_prompts(tokenizer, family: str, count: int = 12) -> list[list[int]]:
    examples, _ = load_split(DataConfig(source="demo"), "test", count)
    fmt = PromptFormat.for_tokenizer(family, DataConfig().prompt, tokenizer)
    prompts = [encode_prompt(tokenizer, fmt, example.text, 96)[0] for example in examples]
    assert len({len(ids) for ids in prompts}) > 1, "prompts must differ in length to exercise padding"
    return prompts


@pytest.mark.parametrize("fixture, family", FAMILIES)
def test_batched_greedy_matches_unbatched(request, fixture, family):
    model, tokenizer = load(request.getfixturevalue(fixture), family)
    prompts = demo_prompts(tokenizer, family)
    single = generate(model, tokenizer, prompts, family, GenerationSettings(max_new_tokens=12, batch_size=1))
    batched = generate(model, tokenizer, prompts, family, GenerationSettings(max_new_tokens=12, batch_size=5))

    assert any(item.new_tokens > 1 for item in single), "the model must generate more than EOS"
    for index, (one, many) in enumerate(zip(single, batched)):
        assert many.text == one.text, f"prompt {index}"
        assert many.new_tokens == one.new_tokens, f"prompt {index}"


@pytest.mark.parametrize("fixture, family", FAMILIES)
def test_results_follow_caller_order(request, fixture, family):
    model, tokenizer = load(request.getfixturevalue(fixture), family)
    prompts = demo_prompts(tokenizer, family)
    results = generate(model, tokenizer, prompts, family, GenerationSettings(max_new_tokens=4, batch_size=4))
    assert [item.prompt_tokens for item in results] == [len(ids) for ids in prompts]


def test_left_padding_keeps_next_token_logits(tiny_llama_dir):
    """What greedy equality rests on: padding changes the logits by float rounding only."""
    model, tokenizer = load(tiny_llama_dir, "causal")
    short, long = sorted(demo_prompts(tokenizer, "causal")[:2], key=len)
    pad = len(long) - len(short)
    with torch.inference_mode():
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]
        padded = model(
            input_ids=torch.tensor([[tokenizer.pad_token_id] * pad + short, long]),
            attention_mask=torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)]),
            position_ids=torch.tensor([[0] * pad + list(range(len(short))), list(range(len(long)))]),
        ).logits[0, -1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


class OutOfMemoryAbove:
    """Wrap a model so generate() fails like CUDA does for batches above ``limit`` rows."""

    def __init__(self, model, limit: int):
        self.model = model
        self.limit = limit
        self.batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kwargs):
        self.batch_sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model.generate(input_ids=input_ids, **kwargs)


def test_out_of_memory_halves_batch_size(tiny_llama_dir, caplog):
    model, tokenizer = load(tiny_llama_dir, "causal")
    prompts = demo_prompts(tokenizer, "causal")
    settings = GenerationSettings(max_new_tokens=6, batch_size=8)
    expected = generate(model, tokenizer, prompts, "causal", settings)

    flaky = OutOfMemoryAbove(model, limit=3)
    with caplog.at_level(logging.WARNING, logger="loratune.evaluate.generation"):
        results = generate(flaky, tokenizer, prompts, "causal", settings)

    assert [item.text for item in results] == [item.text for item in expected]
    assert flaky.batch_sizes[:3] == [8, 4, 2]
    assert max(flaky.batch_sizes[3:]) == 2  # the smaller size is kept for later batches
    assert "retrying with batch size 2" in caplog.text


def test_out_of_memory_at_batch_size_one_raises(tiny_llama_dir):
    model, tokenizer = load(tiny_llama_dir, "causal")
    prompts = demo_prompts(tokenizer, "causal", count=3)
    with pytest.raises(torch.OutOfMemoryError):
        generate(OutOfMemoryAbove(model, limit=0), tokenizer, prompts, "causal", GenerationSettings(batch_size=2))


def test_other_runtime_errors_are_not_retried(tiny_llama_dir):
    model, tokenizer = load(tiny_llama_dir, "causal")

    class Broken(OutOfMemoryAbove):
        def generate(self, input_ids, **kwargs):
            self.batch_sizes.append(input_ids.shape[0])
            raise RuntimeError("shape mismatch")

    broken = Broken(model, limit=0)
    prompts = demo_prompts(tokenizer, "causal", count=4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generate(broken, tokenizer, prompts, "causal", GenerationSettings(batch_size=4))
    assert broken.batch_sizes == [4]
