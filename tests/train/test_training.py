"""End-to-end training on tiny random models: invariants of LoRA and of the run folder."""

import json
import os
import platform
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from loratune.config import ConfigError, build_config
from loratune.data.formatting import IGNORE_INDEX
from loratune.train.recipe import OutputDirError, train
from loratune.train.trainer import LoraTrainer, PadCollator


def tiny_config(model_dir, out_dir, **train_overrides):
    train_section = {"output_dir": str(out_dir), "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 2, "report_to": ["tensorboard"]}
    train_section.update(train_overrides)
    return build_config({
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": "demo", "max_train_samples": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": train_section,
    })


@pytest.mark.parametrize("fixture", ["tiny_t5_dir", "tiny_llama_dir"])
def test_training_changes_only_lora_weights(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    run_dir = train(tiny_config(model_dir, tmp_path / "run"))

    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert lora_b
    for name, tensor in lora_b.items():
        # PEFT initialises B to zero, so any non-zero B was learned.
        assert tensor.abs().sum() > 0, f"{name} did not change"

    from loratune.models.inference import load_run_for_inference

    loaded = load_run_for_inference(run_dir, merge=False)
    model_class = AutoModelForSeq2SeqLM if loaded.family == "seq2seq" else AutoModelForCausalLM
    original = model_class.from_pretrained(model_dir).state_dict()
    base = loaded.model.get_base_model()
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        assert torch.equal(tensor, original[key]), f"base weight {key} changed"


def test_run_folder_describes_itself(tiny_llama_dir, tmp_path):
    run_dir = train(tiny_config(tiny_llama_dir, tmp_path / "run"))
    for name in ("loratune.json", "config.yaml", "data_stats.json", "train_log.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    umask = os.umask(0)
    os.umask(umask)
    for weights in (run_dir / "adapter" / "adapter_model.safetensors",
                    run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights
    info = json.loads((run_dir / "loratune.json").read_text())
    assert info["base_model"] == str(tiny_llama_dir)
    assert info["family"] == "causal"
    assert info["prompt"]["use_chat_template"] is True
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3]
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["splits"]["train"]["rows_kept"] == 16
    assert set(stats["train_lengths"]["input"]) == {"count", "mean", "p50", "p90", "p95", "max"}


def test_second_run_into_same_folder_is_refused(tiny_llama_dir, tmp_path):
    train(tiny_config(tiny_llama_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(OutputDirError, match="already contains files from another run"):
        train(tiny_config(tiny_llama_dir, tmp_path / "run", max_steps=1))


def test_fp16_is_refused_for_t5(tiny_t5_dir, tmp_path):
    with pytest.raises(ConfigError, match="T5-family models overflow in fp16"):
        train(tiny_config(tiny_t5_dir, tmp_path / "run", precision="fp16"))


def test_response_only_loss_matches_full_loss(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    collator = PadCollator(pad_token_id=0)
    features = [
        {"input_ids": [3, 10, 11, 12, 13, 1], "labels": [IGNORE_INDEX] * 3 + [12, 13, 1]},
        {"input_ids": [3, 20, 21, 1], "labels": [IGNORE_INDEX] * 2 + [21, 1]},
    ]
    batch = collator(features)
    assert batch["input_ids"][1].tolist() == [3, 20, 21, 1, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 21, 1, IGNORE_INDEX, IGNORE_INDEX]
    expected = model(**batch).loss

    trainer = LoraTrainer.__new__(LoraTrainer)
    trainer.family = "causal"

    class _Accelerator:
        num_processes = 1

        @staticmethod
        def unwrap_model(m):
            return m

    trainer.accelerator = _Accelerator()
    loss = LoraTrainer.compute_loss(trainer, model, dict(batch))
    torch.testing.assert_close(loss, expected)


def test_failed_run_does_not_block_retry(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, tmp_path / "run", max_steps=1)
    broken = config.model_copy(update={"data": config.data.model_copy(update={"source": str(tmp_path / "absent")})})
    from loratune.data.loading import DataError

    with pytest.raises(DataError, match="data source not found"):
        train(broken)
    assert (tmp_path / "run" / "config.yaml").is_file()
    run_dir = train(config)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_low_memory_allocator_switch(tiny_llama_dir, tmp_path, monkeypatch):
    import loratune.train.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "use_low_memory_allocator", lambda: calls.append(True) or True)
    train(tiny_config(tiny_llama_dir, tmp_path / "default", max_steps=1))
    assert calls == []
    train(tiny_config(tiny_llama_dir, tmp_path / "low", max_steps=1, low_memory_allocator=True))
    assert calls == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_low_memory_allocator_applies_on_glibc():
    # A child process, so that the test session keeps glibc's default allocator settings.
    code = "from loratune.train.memory import use_low_memory_allocator as f; print(f())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ("True" if platform.libc_ver()[0] == "glibc" else "False")
