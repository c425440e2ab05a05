"""SIGKILL a real training process at several points; --resume must end bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from fault_helpers import assert_same_run

from loratune.train.checkpoints import STAGING_DIR, checkpoint_problems, list_checkpoints

# (fault, step, checkpoint the resumed run starts from). Checkpoints come every 3 steps, and
# the default save_total_limit=2 keeps the newest two. An epoch is 15 steps. The loss is
# logged every 4 steps, so checkpoints 9 and 18 fall inside a log window.
SCENARIOS = [
    ("kill-after-save", 18, 18),  # mid second epoch: batch order and pending loss sum restored
    ("kill-mid-save", 18, 15),  # checkpoint-18 half written; falls back to the epoch boundary
    ("kill-in-adapter-save", 0, 20),  # training finished, final adapter/ half written
    pytest.param("kill-after-step", 11, 9, marks=pytest.mark.slow),  # between checkpoints
    pytest.param("kill-in-eval", 10, 9, marks=pytest.mark.slow),  # inside the validation loss
]


@pytest.mark.parametrize(("fault", "step", "resumed_from"), SCENARIOS, ids=lambda value: str(value))
def test_resume_after_sigkill_matches_uninterrupted(fault_runs, reference_run, tmp_path, fault, step, resumed_from):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")

    crashed = fault_runs.run(args, fault, step)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    for path in list_checkpoints(checkpoints):
        assert checkpoint_problems(path) == [], path
    if fault == "kill-mid-save":
        assert (checkpoints / STAGING_DIR / f"checkpoint-{step}" / "optimizer.pt").is_file()
        assert not (checkpoints / f"checkpoint-{step}").exists()
    if fault == "kill-in-adapter-save":
        assert not (run_dir / "adapter").exists()

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoints / f'checkpoint-{resumed_from}'}" in resumed.stderr
    assert not (checkpoints / STAGING_DIR).exists()
    assert (run_dir / "loratune.json").is_file()
    assert_same_run(reference_run, run_dir)


@pytest.mark.slow
def test_resume_after_sigkill_in_final_evaluation(fault_runs, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir)

    crashed = fault_runs.run(args, "kill-in-final-eval")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not (run_dir / "eval").exists()

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is the final step; restoring its adapter without training" in resumed.stderr
    assert (run_dir / "eval" / "test" / "metrics.json").is_file()
    assert_same_run(reference_run, run_dir)


@pytest.mark.slow
def test_resume_after_external_sigkill(fault_runs, reference_run, tmp_path):
    """Kill from outside at whatever point the run has reached once step 8 is logged."""
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval", "train.logging_steps=1")
    reference_args = fault_runs.args(tmp_path / "reference", "--no-eval", "train.logging_steps=1")
    reference = fault_runs.run(reference_args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loratune.cli.main", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and log.read_text().count('"loss"') >= 8:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "reference", run_dir)


def test_resume_under_bf16_autocast_matches_uninterrupted(fault_runs, tmp_path):
    """The default CPU precision: bf16 autocast with the LoRA branch in fp32."""
    reference_dir = tmp_path / "reference"
    reference = fault_runs.run(fault_runs.args(reference_dir, "--no-eval", "train.precision=bf16"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "LoRA branch of 8 layers computed in fp32 under bf16 autocast" in reference.stderr

    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval", "train.precision=bf16")
    crashed = fault_runs.run(args, "kill-after-save", 9)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {run_dir / 'checkpoints' / 'checkpoint-9'}" in resumed.stderr
    assert_same_run(reference_dir, run_dir)
