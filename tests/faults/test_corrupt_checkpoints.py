"""Damaged checkpoints are detected file by file, set aside with a warning, and skipped."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
from fault_helpers import assert_same_run

from loratune.train.checkpoints import (
    STAGING_DIR,
    CheckpointError,
    checkpoint_problems,
    find_resume_checkpoint,
    list_checkpoints,
    trim_train_log,
)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def set_step(path: Path) -> None:
    state = json.loads(path.read_text())
    state["global_step"] = 7
    path.write_text(json.dumps(state))


# (file, damage, expected problem)
DAMAGE = [
    ("optimizer.pt", Path.unlink, "optimizer.pt is missing"),
    ("scheduler.pt", Path.unlink, "scheduler.pt is missing"),
    ("trainer_state.json", Path.unlink, "trainer_state.json is missing"),
    ("adapter_model.safetensors", Path.unlink, "adapter_model.safetensors is missing"),
    ("optimizer.pt", truncate, "optimizer.pt is truncated or corrupt"),
    ("rng_state.pth", lambda path: path.write_bytes(b""), "rng_state.pth is truncated or corrupt"),
    ("optimizer.pt", flip_middle_byte, "optimizer.pt is corrupt (bad CRC in "),
    ("adapter_model.safetensors", truncate, "adapter_model.safetensors is unreadable"),
    ("trainer_state.json", truncate, "trainer_state.json is not valid JSON"),
    ("adapter_config.json", lambda path: path.write_text("{"), "adapter_config.json is not valid JSON"),
    ("trainer_state.json", set_step, "trainer_state.json records step 7, not 20"),
]


@pytest.fixture
def checkpoints(reference_run, tmp_path) -> Path:
    """A copy of the reference run's checkpoints folder: checkpoint-18 and checkpoint-20."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", folder)
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-18", "checkpoint-20"]
    return folder


def test_complete_checkpoints_have_no_problems(checkpoints):
    for path in list_checkpoints(checkpoints):
        assert checkpoint_problems(path) == []


@pytest.mark.parametrize(("name", "damage", "problem"), DAMAGE, ids=lambda value: getattr(value, "__name__", value))
def test_damaged_checkpoint_is_skipped(checkpoints, caplog, name, damage, problem):
    damage(checkpoints / "checkpoint-20" / name)
    problems = checkpoint_problems(checkpoints / "checkpoint-20")
    assert len(problems) == 1
    assert problems[0].startswith(problem)

    with caplog.at_level(logging.WARNING, logger="loratune.train.checkpoints"):
        chosen = find_resume_checkpoint(checkpoints)
    assert chosen == checkpoints / "checkpoint-18"
    assert (checkpoints / "corrupt-checkpoint-20").is_dir()
    assert not (checkpoints / "checkpoint-20").exists()
    warning = caplog.records[-1].getMessage()
    assert warning.startswith(f"Skipping {checkpoints / 'checkpoint-20'} because {problem}")
    assert "Renamed it to corrupt-checkpoint-20 and falling back to the previous checkpoint." in warning


def test_every_checkpoint_damaged_is_an_error(checkpoints):
    for path in list_checkpoints(checkpoints):
        (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        find_resume_checkpoint(checkpoints)
    assert str(caught.value) == (
        f"--resume: none of the 2 checkpoints in {checkpoints} is complete (see the warnings above). "
        "Start the run again without --resume, with train.overwrite_output_dir=true."
    )


def test_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"contains no checkpoint-<step> folder; the run stopped before"):
        find_resume_checkpoint(tmp_path / "checkpoints")


def test_partial_staging_folder_is_removed(checkpoints):
    staged = checkpoints / STAGING_DIR / "checkpoint-21"
    staged.mkdir(parents=True)
    (staged / "optimizer.pt").write_bytes(b"PK")
    assert find_resume_checkpoint(checkpoints) == checkpoints / "checkpoint-20"
    assert not (checkpoints / STAGING_DIR).exists()


def test_train_log_is_trimmed_to_checkpoint(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"step": 4, "loss": 1.0}, {"step": 8, "eval_loss": 2.0}, {"step": 8, "train_runtime": 3.0},
               {"step": 12, "loss": 0.5}]
    log.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"step": 1')
    assert trim_train_log(log, 8) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:2]


def test_resume_falls_back_past_damaged_checkpoint(fault_runs, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = fault_runs.args(run_dir, "--no-eval")
    crashed = fault_runs.run(args, "kill-after-step", 11)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    newest = run_dir / "checkpoints" / "checkpoint-9"
    truncate(newest / "adapter_model.safetensors")

    resumed = fault_runs.run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Skipping {newest} because adapter_model.safetensors is unreadable" in resumed.stderr
    assert f"Resuming from {run_dir / 'checkpoints' / 'checkpoint-6'}" in resumed.stderr
    assert_same_run(reference_run, run_dir)
