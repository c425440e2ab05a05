"""A full disk while saving fails with one line and keeps the last complete checkpoint."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from fault_helpers import assert_same_run
from peft import PeftModel

from loratune.cli.main import main
from loratune.train.checkpoints import STAGING_DIR, checkpoint_problems, list_checkpoints


def disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def one_thread():
    """Match the reference run, which trains with one CPU thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_disk_full_in_checkpoint_keeps_previous(fault_runs, reference_run, tmp_path, monkeypatch, capsys, one_thread):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")
    real_save = torch.save

    def save_until_full(obj, target, *rest, **kwargs):
        if str(target).endswith("checkpoint-6/optimizer.pt"):
            raise disk_full(target)
        return real_save(obj, target, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    assert main(args) == 1
    checkpoints = run_dir / "checkpoints"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: failed to write checkpoint-6 in {checkpoints}: No space left on device. "
        "The last complete checkpoint is checkpoint-3; free space on that disk, then rerun with --resume."
    )
    assert [path.name for path in list_checkpoints(checkpoints)] == ["checkpoint-3"]
    assert checkpoint_problems(checkpoints / "checkpoint-3") == []
    assert not (checkpoints / STAGING_DIR).exists()

    monkeypatch.setattr(torch, "save", real_save)
    assert main([*args, "--resume"]) == 0
    assert_same_run(reference_run, run_dir)


def test_disk_full_in_final_adapter(fault_runs, reference_run, tmp_path, monkeypatch, capsys, one_thread):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")
    real_save_pretrained = PeftModel.save_pretrained

    def save_pretrained_until_full(self, directory, *rest, **kwargs):
        if str(directory).endswith("adapter.tmp"):
            raise disk_full(directory)
        return real_save_pretrained(self, directory, *rest, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained_until_full)
    assert main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: No space left on device: {run_dir / 'adapter.tmp'}"
    )
    assert checkpoint_problems(run_dir / "checkpoints" / "checkpoint-20") == []
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "loratune.json").exists()

    monkeypatch.setattr(PeftModel, "save_pretrained", real_save_pretrained)
    assert main([*args, "--resume"]) == 0
    assert_same_run(reference_run, run_dir)
