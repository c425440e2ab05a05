"""Helpers for the fault-injection tests: run the real CLI in a subprocess, compare runs.

Every fault test trains the tiny random Llama of tests/conftest.py for 20 steps on the demo
set. An epoch is 15 steps, so each run crosses an epoch boundary. A checkpoint is written
every 3 steps, the loss logged every 4 and the validation loss computed every 5. Results are
compared with one uninterrupted run of the same command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

DRIVER = Path(__file__).with_name("crash_driver.py")
CURVE_KEYS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss")


class FaultRuns:
    """Build CLI arguments, run them in a subprocess, and read what a run left behind."""

    def __init__(self, recipe: Path, model_dir: Path):
        self.recipe = recipe
        self.model_dir = model_dir

    def args(self, run_dir: Path, *extra: str) -> list[str]:
        return [
            "train", str(self.recipe), f"model.name_or_path={self.model_dir}", "data.source=demo",
            f"train.output_dir={run_dir}", "train.max_steps=20", "train.batch_size=4",
            "train.save_steps=3", "train.logging_steps=4", "train.eval_steps=5",
            "train.precision=fp32", "train.report_to=[]", "eval.max_samples=2",
            "generation.max_new_tokens=4", *extra,
        ]

    def run(self, args: list[str], fault: str | None = None, step: int = 0) -> subprocess.CompletedProcess:
        if fault is None:
            command = [sys.executable, "-m", "loratune.cli.main", *args]
        else:
            command = [sys.executable, str(DRIVER), fault, str(step), *args]
        # One thread: on the 2-core dev machine under load from other jobs, 20 steps took
        # 8 s with torch's default two threads and under 1 s with one.
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]


def loss_curve(run_dir: Path) -> list[dict]:
    """Training and validation loss records of train_log.jsonl, without wall-clock fields."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    curve = [record for record in records if "loss" in record or "eval_loss" in record]
    return [{key: record[key] for key in CURVE_KEYS if key in record} for record in curve]


def assert_same_tensors(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys(), what
    for key in expected:
        if isinstance(expected[key], dict):
            assert_same_tensors(expected[key], actual[key], f"{what}[{key}]")
        elif isinstance(expected[key], torch.Tensor):
            assert torch.equal(expected[key], actual[key]), f"{what}: {key} differs"
        else:
            assert expected[key] == actual[key], f"{what}: {key} differs"


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Assert bit-identical adapter weights, final optimizer state and loss curve."""
    assert_same_tensors(adapter_weights(reference), adapter_weights(run_dir), "adapter")
    final = Path("checkpoints") / "checkpoint-20"
    assert_same_tensors(optimizer_state(reference / final), optimizer_state(run_dir / final), "optimizer state")
    assert loss_curve(run_dir) == loss_curve(reference)
