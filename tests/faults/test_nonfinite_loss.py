"""A NaN or infinite loss stops training with the step and the likely cause."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loratune.cli.main import main
from loratune.train.callbacks import NonFiniteLossError, check_finite_loss, nonfinite_loss_causes
from loratune.train.checkpoints import checkpoint_problems, list_checkpoints
from loratune.train.trainer import LoraTrainer


def test_huge_learning_rate_stops_with_step_and_cause(fault_runs, tmp_path):
    run_dir = tmp_path / "run"
    result = fault_runs.run(fault_runs.args(run_dir, "--no-eval", "train.learning_rate=1e30"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        "loratune train: error: the training loss is nan at step 3, so training stopped before that "
        "step's update. Likely cause: a learning rate too high for this model: train.learning_rate=1e+30; "
        "try it 10x lower. Fix it, then start again or continue from the last checkpoint with --resume."
    )
    assert "Traceback" not in result.stderr
    assert not (run_dir / "adapter").exists()


def test_infinite_loss_keeps_last_checkpoint(fault_runs, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_compute_loss = LoraTrainer.compute_loss

    def loss_overflows_at_step_5(self, *args, **kwargs):
        loss = real_compute_loss(self, *args, **kwargs)
        return loss * float("inf") if self.state.global_step == 4 else loss

    monkeypatch.setattr(LoraTrainer, "compute_loss", loss_overflows_at_step_5)
    assert main(fault_runs.args(run_dir, "--no-eval")) == 1
    assert "the training loss is inf at step 5, so training stopped" in capsys.readouterr().err
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [path.name for path in checkpoints] == ["checkpoint-3"]
    assert checkpoint_problems(checkpoints[0]) == []


def test_finite_loss_passes():
    args = SimpleNamespace(fp16=False, bf16=False, learning_rate=1e-3)
    check_finite_loss(torch.tensor(2.5), 1, args, "llama")


@pytest.mark.parametrize(
    ("fp16", "bf16", "model_type", "first_cause"),
    [
        (True, False, "t5", "fp16 overflow: activations above 65504 overflow (T5-family models are known to)"),
        (True, False, "llama", "fp16 overflow: activations above 65504 overflow; use train.precision=bf16 or fp32"),
        (False, True, "llama", "bf16 rounding in mixed precision; try train.precision=fp32"),
        (False, False, "llama", "a learning rate too high for this model: train.learning_rate=0.001; try it 10x lower"),
    ],
)
def test_causes_follow_precision(fp16, bf16, model_type, first_cause):
    args = SimpleNamespace(fp16=fp16, bf16=bf16, learning_rate=1e-3)
    causes = nonfinite_loss_causes(args, model_type)
    assert causes[0].startswith(first_cause)
    assert causes[-1].startswith("a learning rate too high")
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at step 7"):
        check_finite_loss(torch.tensor(float("nan")), 7, args, model_type)
