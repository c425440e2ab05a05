"""A tiny run folder to serve, and one torch thread for the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loratune.config import ModelConfig, build_config
from loratune.models.inference import load_for_inference
from loratune.models.loading import load_model
from loratune.runs import ADAPTER_DIR
from loratune.train.recipe import train


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # Tiny models gain nothing from a second thread, and on a busy 2-core machine two
    # threads that wait on each other make each generate() call up to 100 times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A tiny Llama (with a chat template) trained for two steps, with random LoRA B matrices.

    An untrained tiny model generates only special tokens, which decode to empty text. Random
    B matrices make it produce words, so comparisons of summaries mean something.
    """
    run_dir = tmp_path_factory.mktemp("chat-run") / "run"
    train(build_config({
        "model": {"name_or_path": str(tiny_llama_dir)},
        "data": {"source": "demo"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(run_dir), "max_steps": 2, "batch_size": 4, "report_to": []},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
    }))
    model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(tiny_llama_dir))).model, str(run_dir / ADAPTER_DIR))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(str(run_dir / ADAPTER_DIR))
    return run_dir


@pytest.fixture(scope="session")
def loaded_chat_run(chat_run):
    return load_for_inference(str(chat_run))
