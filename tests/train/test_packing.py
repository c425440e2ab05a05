"""Sequence packing: row layout, and the same loss and gradients as padded batches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from loratune.config import ConfigError, LoraSettings, build_config
from loratune.data.formatting import IGNORE_INDEX
from loratune.models.lora import attach_lora
from loratune.train.packing import PackingCollator, pack_rows
from loratune.train.recipe import train
from loratune.train.trainer import LoraTrainer, PadCollator

PAD_ID = 0


def make_features(lengths: list[int], prompt_length: int = 3, seed: int = 0) -> list[dict]:
    """Causal features like build_training_features makes: prompt labels ignored, response labelled."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in lengths:
        ids = torch.randint(6, 60, (length,), generator=generator).tolist()
        prompt = min(prompt_length, length - 1)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        features.append({"input_ids": ids, "labels": labels, "length": length})
    return features


def test_pack_rows_places_each_index_once():
    lengths = [9, 2, 7, 3, 5, 1, 9, 4]
    rows = pack_rows(lengths, capacity=9)
    placed = sorted(index for row in rows for index in row)
    assert placed == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 9
    # 40 tokens fit in 5 rows of 9; first-fit decreasing finds that here.
    assert len(rows) == 5


def test_pack_rows_gives_overlong_example_own_row():
    rows = pack_rows([12, 3], capacity=10)
    assert [0] in rows
    assert [1] in rows


def test_collator_resets_positions_per_example():
    features = make_features([6, 4, 2])
    batch = PackingCollator(PAD_ID)(features)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (2, 6)
    # Row 0 holds the 6-token example; row 1 holds the 4- and 2-token examples.
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1]
    assert batch["input_ids"][1].tolist() == features[1]["input_ids"] + features[2]["input_ids"]


def test_collator_ignores_first_label_and_pad_tail():
    features = make_features([6, 3], prompt_length=1)
    features[1]["labels"] = list(features[1]["input_ids"])  # a fully labelled example
    batch = PackingCollator(PAD_ID)(features)
    row = batch["labels"][1].tolist()
    assert row[0] == IGNORE_INDEX  # no token may learn to predict the next example's start
    assert row[1:3] == features[1]["input_ids"][1:]
    assert row[3:] == [IGNORE_INDEX] * 3
    assert batch["input_ids"][1, 3:].tolist() == [PAD_ID] * 3


def test_collator_keeps_every_label_token():
    features = make_features([11, 7, 5, 5, 3, 2, 9, 4])
    packed = PackingCollator(PAD_ID)(features)
    padded = PadCollator(PAD_ID)(features)
    # The loss reads labels[:, 1:], so both layouts must train on the same number of tokens.
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert packed["input_ids"].numel() < padded["input_ids"].numel()


def lora_trainer(model_dir, tmp_path, attention: str) -> LoraTrainer:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    torch.manual_seed(1)
    model = attach_lora(model, LoraSettings(r=4, dropout=0.0), "causal")
    # A non-zero B matrix, so the adapter changes the output and receives gradients on A too.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return LoraTrainer(model=model, args=args, family="causal")


def loss_and_grads(trainer: LoraTrainer, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_equals_padded_loss(tiny_llama_dir, tmp_path, attention):
    trainer = lora_trainer(tiny_llama_dir, tmp_path, attention)
    features = make_features([23, 17, 9, 9, 6, 14, 30, 5], prompt_length=4)
    padded_loss, padded_grads = loss_and_grads(trainer, PadCollator(PAD_ID)(features))
    packed_batch = PackingCollator(PAD_ID)(features)
    assert packed_batch["input_ids"].shape[0] < len(features)  # some rows really hold several examples
    packed_loss, packed_grads = loss_and_grads(trainer, packed_batch)

    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_loss_changes_without_position_reset(tiny_llama_dir, tmp_path):
    """Control: without restarting positions, examples attend to each other and the loss moves."""
    trainer = lora_trainer(tiny_llama_dir, tmp_path, "sdpa")
    features = make_features([23, 17, 9, 9, 6, 14, 30, 5], prompt_length=4)
    padded_loss, _ = loss_and_grads(trainer, PadCollator(PAD_ID)(features))
    leaky = PackingCollator(PAD_ID)(features)
    width = leaky["input_ids"].shape[1]
    leaky["position_ids"] = torch.arange(width).expand_as(leaky["input_ids"]).clone()
    leaky_loss, _ = loss_and_grads(trainer, leaky)
    assert abs(leaky_loss - padded_loss) > 1e-4


def train_losses(model_dir, out_dir, packing: bool) -> list[float]:
    config = build_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"source": "demo", "max_train_samples": 24},
            "lora": {"r": 4, "dropout": 0.0},
            "train": {
                "output_dir": str(out_dir),
                "max_steps": 4,
                "batch_size": 6,
                "precision": "fp32",
                "group_by_length": False,
                "packing": packing,
                "logging_steps": 1,
                "report_to": [],
            },
            "eval": {"run_after_training": False},
        }
    )
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def test_training_run_with_packing_matches_padding(tiny_llama_dir, tmp_path):
    padded = train_losses(tiny_llama_dir, tmp_path / "padded", packing=False)
    packed = train_losses(tiny_llama_dir, tmp_path / "packed", packing=True)
    assert len(padded) == 4
    assert packed == pytest.approx(padded, rel=1e-4)


def test_config_rejects_packing_for_seq2seq():
    with pytest.raises(ConfigError, match="train.packing"):
        build_config({"model": {"family": "seq2seq"}, "train": {"packing": True}})


def test_recipe_rejects_packing_for_detected_seq2seq(tiny_t5_dir, tmp_path):
    config = build_config(
        {
            "model": {"name_or_path": str(tiny_t5_dir)},
            "data": {"source": "demo"},
            "train": {"output_dir": str(tmp_path / "run"), "packing": True, "report_to": []},
        }
    )
    with pytest.raises(ConfigError, match="packing is for causal models only"):
        train(config)
