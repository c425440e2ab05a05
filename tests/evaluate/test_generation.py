"""Batched generation: same greedy text as one prompt at a time, caller order, token budget, OOM fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from loratune.config import DataConfig, GenerationSettings
from loratune.data.formatting import PromptFormat, encode_prompt
from loratune.data.loading import load_split
from loratune.evaluate.generation import generate, plan_batches

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


def test_plan_batches_within_limits():
    lengths = [100, 12, 7, 100, 55, 9, 30, 100, 8, 11, 10, 64, 13, 7, 6, 5]
    batches = plan_batches(lengths, batch_size=6, batch_tokens=200)

    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in batch) for batch in batches]
    assert longest == sorted(longest, reverse=True)
    for batch, width in zip(batches, longest):
        assert len(batch) <= 6
        assert len(batch) == 1 or len(batch) * width <= 200
    # Longest first: 100-token prompts in pairs, 55 with two shorter ones, and prompts of 12
    # tokens or fewer in batches of 6.
    assert [len(batch) for batch in batches] == [2, 2, 3, 6, 3]


def test_plan_batches_row_limit_only():
    batches = plan_batches([5, 50, 500, 5, 50], batch_size=2)
    assert batches == [[2, 1], [4, 0], [3]]


def test_plan_batches_overlong_prompt_alone():
    assert plan_batches([900, 10], batch_size=4, batch_tokens=100) == [[0], [1]]


class RecordingModel:
    """Wrap a model and record the rows of every generate() call."""

    def __init__(self, model):
        self.model = model
        self.batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kwargs):
        self.batch_sizes.append(input_ids.shape[0])
        return self.model.generate(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("fixture, family", FAMILIES)
def test_token_budget_matches_unbatched(request, fixture, family):
    model, tokenizer = load(request.getfixturevalue(fixture), family)
    prompts = demo_prompts(tokenizer, family)
    # Keep only the ends of half the prompts, so the lengths spread widely.
    prompts = prompts[:6] + [ids[-(8 + 3 * i):] for i, ids in enumerate(prompts[6:])]
    single = generate(model, tokenizer, prompts, family, GenerationSettings(max_new_tokens=12, batch_size=1))
    budget = 2 * max(len(ids) for ids in prompts)
    settings = GenerationSettings(max_new_tokens=12, batch_size=12, batch_tokens=budget)
    recorder = RecordingModel(model)
    budgeted = generate(recorder, tokenizer, prompts, family, settings)

    expected = plan_batches([len(ids) for ids in prompts], 12, budget)
    assert recorder.batch_sizes == [len(batch) for batch in expected]
    assert len(set(recorder.batch_sizes)) > 1, "short prompts must share larger batches"
    assert [item.text for item in budgeted] == [item.text for item in single]
    assert [item.new_tokens for item in budgeted] == [item.new_tokens for item in single]


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


class OutOfMemoryAbove(RecordingModel):
    """Wrap a model so generate() fails like CUDA does for batches above ``limit`` rows."""

    def __init__(self, model, limit: int):
        super().__init__(model)
        self.limit = limit

    def generate(self, input_ids, **kwargs):
        if input_ids.shape[0] > self.limit:
            self.batch_sizes.append(input_ids.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(input_ids, **kwargs)


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
