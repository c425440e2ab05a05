"""Run folders of tiny models for the merge and predict tests.

Each run is trained for two steps with the real recipe, then its LoRA B matrices are
replaced by random values. Fresh B matrices are zero, and two steps leave them near zero,
so without this a merge that dropped the adapter would still pass the logits check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loratune.config import ModelConfig, build_config
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


def randomize_lora_b(run_dir: Path, base_dir: Path, seed: int = 0, std: float = 0.1) -> None:
    """Overwrite the LoRA B matrices of ``run_dir``'s adapter with seeded random values."""
    adapter_dir = run_dir / ADAPTER_DIR
    base = load_model(ModelConfig(name_or_path=str(base_dir))).model
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.save_pretrained(str(adapter_dir))


def make_tiny_run(run_dir: Path, base_dir: Path) -> Path:
    """Train a tiny model for two steps on the demo data, then randomize its LoRA B."""
    config = build_config({
        "model": {"name_or_path": str(base_dir)},
        "data": {"source": "demo"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(run_dir), "max_steps": 2, "batch_size": 4, "report_to": []},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
    })
    train(config)
    randomize_lora_b(run_dir, base_dir)
    return run_dir


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, tiny_llama_dir) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("llama-run") / "run", tiny_llama_dir)


@pytest.fixture(scope="session")
def t5_run(tmp_path_factory, tiny_t5_dir) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("t5-run") / "run", tiny_t5_dir)
