"""Length-grouped batching: every example once per epoch, similar lengths, batches shuffled."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from loratune.config import build_config
from loratune.data.formatting import IGNORE_INDEX
from loratune.train.packing import ShuffledLengthGroupedSampler
from loratune.train.recipe import resolve_precision, training_arguments
from loratune.train.trainer import LoraTrainer, PadCollator

NUM_EXAMPLES = 403  # not a multiple of any batch size below, so the last batch is partial


def length_dataset(num_examples: int = NUM_EXAMPLES, seed: int = 0) -> datasets.Dataset:
    """Rows whose first token is the row index, so a batch names the examples it holds."""
    rng = random.Random(seed)
    rows = []
    for index in range(num_examples):
        length = rng.randint(2, 120)
        ids = [index] + [7] * (length - 1)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "length": length})
    return datasets.Dataset.from_list(rows)


def build_trainer(model_dir, tmp_path, dataset, batch_size: int, group_by_length: bool = True, accumulation: int = 1):
    config = build_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "train": {
                "output_dir": str(tmp_path),
                "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation,
                "group_by_length": group_by_length,
                "precision": "fp32",
                "report_to": [],
            },
        }
    )
    args = training_arguments(config, tmp_path, resolve_precision(config), has_validation=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return LoraTrainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(0), family="causal")


def epoch_batches(trainer: LoraTrainer) -> list[list[int]]:
    """Example indices of every batch the real train dataloader yields in one epoch."""
    return [batch["input_ids"][:, 0].tolist() for batch in trainer.get_train_dataloader()]


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_each_example_once_per_epoch(tiny_llama_dir, tmp_path, batch_size):
    set_seed(0)
    trainer = build_trainer(tiny_llama_dir, tmp_path, length_dataset(), batch_size)
    for _ in range(2):  # each epoch draws a new order
        seen = [index for batch in epoch_batches(trainer) for index in batch]
        assert len(seen) == NUM_EXAMPLES
        assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_each_example_once_with_accumulation(tiny_llama_dir, tmp_path):
    set_seed(0)
    trainer = build_trainer(tiny_llama_dir, tmp_path, length_dataset(), batch_size=4, accumulation=3)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ShuffledLengthGroupedSampler)
    assert sampler.batch_size == 12  # one optimizer step's examples are grouped together
    seen = [index for batch in epoch_batches(trainer) for index in batch]
    assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_epochs_use_different_orders(tiny_llama_dir, tmp_path):
    set_seed(0)
    trainer = build_trainer(tiny_llama_dir, tmp_path, length_dataset(), batch_size=4)
    assert epoch_batches(trainer) != epoch_batches(trainer)


def batch_spread(batches: list[list[int]], lengths: list[int]) -> float:
    """Mean of (longest - shortest) length inside each batch."""
    spreads = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
    return sum(spreads) / len(spreads)


def test_grouped_batches_pad_less_than_random(tiny_llama_dir, tmp_path):
    dataset = length_dataset()
    lengths = dataset["length"]
    set_seed(0)
    grouped = epoch_batches(build_trainer(tiny_llama_dir, tmp_path / "grouped", dataset, batch_size=8))
    set_seed(0)
    shuffled = epoch_batches(build_trainer(tiny_llama_dir, tmp_path / "random", dataset, 8, group_by_length=False))
    assert batch_spread(grouped, lengths) < 0.25 * batch_spread(shuffled, lengths)


def test_longest_batch_first_and_rest_shuffled():
    lengths = length_dataset()["length"]
    generator = torch.Generator().manual_seed(0)
    batch_size = 4
    indices = list(ShuffledLengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    longest = [max(lengths[i] for i in batch) for batch in batches]

    assert longest[0] == max(lengths)
    # transformers' sampler yields the batches of a length group from longest to shortest. After
    # shuffling, the batch lengths must rise many times within the epoch.
    rises = sum(1 for before, after in zip(longest[1:], longest[2:]) if after > before)
    assert rises > len(batches) // 4


def test_small_data_set_is_grouped():
    """80 examples at batch 8: transformers' own sampler would sort groups of 16 only."""
    lengths = length_dataset(num_examples=80)["length"]
    generator = torch.Generator().manual_seed(0)
    indices = list(ShuffledLengthGroupedSampler(8, lengths=lengths, generator=generator))
    batches = [indices[i : i + 8] for i in range(0, len(indices), 8)]
    assert sorted(indices) == list(range(80))
    shuffled = torch.randperm(80, generator=generator).tolist()
    random_batches = [shuffled[i : i + 8] for i in range(0, 80, 8)]
    assert batch_spread(batches, lengths) < 0.2 * batch_spread(random_batches, lengths)


def test_partial_batch_stays_last(tiny_llama_dir, tmp_path):
    """A partial batch shuffled into the middle would shift every later batch boundary."""
    dataset = length_dataset()
    lengths = dataset["length"]
    for seed in range(3):
        set_seed(seed)
        batches = epoch_batches(build_trainer(tiny_llama_dir, tmp_path / str(seed), dataset, batch_size=8))
        assert len(batches[-1]) == NUM_EXAMPLES % 8
        assert all(len(batch) == 8 for batch in batches[:-1])
        # 400 examples sorted as one group: 8 neighbours span a few length units, random ones ~80.
        spreads = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches[:-1]]
        assert max(spreads) <= 15, f"seed {seed}"
