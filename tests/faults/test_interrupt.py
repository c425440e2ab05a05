"""Ctrl-C: the first SIGINT saves a checkpoint and exits cleanly, a second exits at once."""

from __future__ import annotations

import pytest
from fault_helpers import assert_same_run

from loratune.train.checkpoints import checkpoint_problems, list_checkpoints


def test_first_sigint_saves_checkpoint_and_exits(fault_runs, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")

    stopped = fault_runs.run(args, "sigint", 17)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "checkpoint-17"
    assert stopped.stderr.splitlines()[-1] == (
        f"loratune train: training interrupted at step 17 of 20; saved {checkpoint}. "
        "Rerun the same command with --resume to continue."
    )
    assert "Traceback" not in stopped.stderr
    assert checkpoint_problems(checkpoint) == []
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "loratune.json").exists()

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stderr
    assert_same_run(reference_run, run_dir)


@pytest.mark.slow
def test_second_sigint_exits_without_saving(fault_runs, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")

    stopped = fault_runs.run(args, "double-sigint", 5)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    # tqdm redraws its open progress bar at exit, after this line.
    assert "loratune train: interrupted" in stopped.stderr.splitlines()
    assert "Traceback" not in stopped.stderr
    assert [path.name for path in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-3"]

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference_run, run_dir)


@pytest.mark.slow
def test_sigint_at_last_step_keeps_adapter(fault_runs, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    stopped = fault_runs.run(fault_runs.args(run_dir), "sigint", 20)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == (
        f"loratune train: interrupted as training finished; the adapter is saved in {run_dir / 'adapter'}. "
        f"Score it with: loratune evaluate {run_dir}"
    )
    assert not (run_dir / "eval").exists()
    assert_same_run(reference_run, run_dir)
