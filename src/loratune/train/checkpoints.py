"""Checkpoint folders: atomic writes, validation, and the choice of where to resume.

Trainer writes ``checkpoint-<step>/`` one file at a time, so a crash in the middle leaves a
folder whose name looks complete. loratune writes every checkpoint into
``checkpoints/.staging/`` and renames it into place only after all its files are flushed to
disk. On ``--resume`` the newest checkpoints are checked file by file, and one that is
incomplete or unreadable (left by an older crash, or damaged later) is renamed to
``corrupt-checkpoint-<step>`` with a warning, and the previous checkpoint is used.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from loratune.config import ConfigError, RunConfig, load_config
from loratune.runs import write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_DIR = ".staging"
CORRUPT_PREFIX = "corrupt-"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Trainer's running loss sum between two log steps, which it does not save itself. Restoring
# it makes the first logged loss after a resume equal to an uninterrupted run's.
LOG_STATE_FILE = "loratune_log_state.json"

JSON_FILES = ("adapter_config.json", TRAINER_STATE_FILE)
# torch.save writes zip archives; the zip index sits at the end, so a cut file fails to open.
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
OPTIONAL_TORCH_FILES = ("scaler.pt",)


class CheckpointError(RuntimeError):
    """Raised when no usable checkpoint exists, or when a checkpoint cannot be written."""


def checkpoint_step(path: Path) -> int | None:
    """Return the step in a ``checkpoint-<step>`` folder name, or None for other names."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: Path) -> list[Path]:
    """Return the ``checkpoint-<step>`` folders in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path.name} is not valid JSON ({error})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{path.name} is truncated or corrupt ({error})"
    if broken is not None:
        return f"{path.name} is corrupt (bad CRC in {broken})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (OSError, SafetensorError) as error:
        return f"{path.name} is unreadable ({error})"
    return None


def checkpoint_problems(path: Path) -> list[str]:
    """List what makes a checkpoint folder unusable for resuming; empty when it is complete."""
    path = Path(path)
    problems = []
    required = (*JSON_FILES, ADAPTER_WEIGHTS_FILE, *TORCH_FILES)
    for name in required:
        if not (path / name).is_file():
            problems.append(f"{name} is missing")
    present = [name for name in (*TORCH_FILES, *OPTIONAL_TORCH_FILES) if (path / name).is_file()]
    checks = [_json_problem(path / name) for name in JSON_FILES if (path / name).is_file()]
    checks += [_torch_file_problem(path / name) for name in present]
    if (path / ADAPTER_WEIGHTS_FILE).is_file():
        checks.append(_safetensors_problem(path / ADAPTER_WEIGHTS_FILE))
    problems += [problem for problem in checks if problem]

    if not problems:
        state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        if state.get("global_step") != checkpoint_step(path):
            problems.append(
                f"{TRAINER_STATE_FILE} records step {state.get('global_step')}, not {checkpoint_step(path)}"
            )
    return problems


def _quarantine(path: Path) -> Path:
    """Rename an unusable checkpoint so that neither resuming nor rotation picks it up."""
    target = path.with_name(CORRUPT_PREFIX + path.name)
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{suffix}")
    path.rename(target)
    return target


def remove_staging(folder: Path) -> None:
    """Delete a half-written checkpoint left in the staging folder by a crash."""
    staging = Path(folder) / STAGING_DIR
    if staging.exists():
        logger.info("Removing the partial checkpoint left in %s", staging)
        shutil.rmtree(staging)


def find_resume_checkpoint(folder: Path) -> Path:
    """Return the newest complete checkpoint in ``folder``, setting aside unusable newer ones.

    Raises ``CheckpointError`` when the folder contains no usable checkpoint.
    """
    folder = Path(folder)
    remove_staging(folder)
    candidates = list_checkpoints(folder)
    for path in reversed(candidates):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        moved = _quarantine(path)
        logger.warning(
            "Skipping %s because %s. Renamed it to %s and falling back to the previous checkpoint.",
            path, "; ".join(problems), moved.name,
        )
    if candidates:
        raise CheckpointError(
            f"--resume: none of the {len(candidates)} checkpoints in {folder} is complete (see the "
            "warnings above). Start the run again without --resume, with train.overwrite_output_dir=true."
        )
    raise CheckpointError(
        f"--resume: {folder} contains no checkpoint-<step> folder; the run stopped before its first "
        "checkpoint. Start it again without --resume, with train.overwrite_output_dir=true."
    )


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Flush a fully written checkpoint to disk and rename it from staging to its final name.

    An existing folder with the final name (a damaged one from an older run) is replaced.
    """
    _fsync_tree(staged)
    if final.exists():
        replaced = final.with_name(f".replaced-{final.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
        staged.rename(final)
        shutil.rmtree(replaced)
    else:
        staged.rename(final)
    _fsync_dir(final.parent)


def checkpoint_write_failure(name: str, run_dir: Path, error: OSError) -> str:
    """Describe a failed checkpoint write, naming the checkpoint that is still complete."""
    previous = list_checkpoints(run_dir)
    fix = "free space on that disk" if error.errno == errno.ENOSPC else "fix the cause"
    if previous:
        advice = f"The last complete checkpoint is {previous[-1].name}; {fix}, then rerun with --resume."
    else:
        advice = f"No checkpoint is complete yet; {fix}, then start the run again."
    return f"failed to write {name} in {run_dir}: {error.strerror or error}. {advice}"


def write_log_state(folder: Path, loss_sum: float, last_logged_step: int) -> None:
    state = {"loss_sum": loss_sum, "last_logged_step": last_logged_step}
    (Path(folder) / LOG_STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")


def read_log_state(checkpoint: Path) -> dict | None:
    """Return the saved logging accumulators, or None for checkpoints written without them."""
    path = Path(checkpoint) / LOG_STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))


def trim_train_log(path: Path, last_step: int) -> int:
    """Drop records logged after ``last_step``, and end-of-call summaries, from a JSONL log.

    Returns the number of records removed. After a resume the log then reads as if the run had
    never stopped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            removed += 1  # a line cut short by the crash
            continue
        if record.get("step", 0) > last_step or "train_runtime" in record:
            removed += 1
            continue
        kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return removed


# Settings whose change makes the saved adapter belong to another model.
RESUME_BLOCKING_PREFIXES = ("model.name_or_path", "model.gguf_file", "model.revision", "model.family", "lora.")
# Settings that do not change what training computes.
RESUME_IGNORED_PREFIXES = ("eval.", "generation.", "train.output_dir", "train.overwrite_output_dir", "train.report_to")


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(saved_path: Path, config: RunConfig) -> list[str]:
    """Compare ``config`` with the config a run was started with; return the changed keys.

    Raises ``CheckpointError`` when the model or LoRA settings changed, because the saved
    adapter would then be loaded into another model. Other changes are allowed with a warning,
    since the resumed run then differs from an uninterrupted one.
    """
    try:
        saved = load_config(saved_path)
    except ConfigError as error:
        logger.warning("Cannot compare with the run's saved config, so changed settings go unnoticed: %s", error)
        return []
    before, after = _flatten(saved.model_dump(mode="json")), _flatten(config.model_dump(mode="json"))
    changes = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    changes = [key for key in changes if not key.startswith(RESUME_IGNORED_PREFIXES)]
    described = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changes]
    blocking = [text for key, text in zip(changes, described) if key.startswith(RESUME_BLOCKING_PREFIXES)]
    if blocking:
        raise CheckpointError(
            f"--resume: the run in {saved_path.parent} was started with other model or LoRA "
            f"settings ({'; '.join(blocking)}). Resume with the settings in {saved_path}, or "
            "start a new run in another train.output_dir."
        )
    if described:
        logger.warning(
            "Resuming with changed settings (%s); the result will differ from an uninterrupted run.",
            "; ".join(described),
        )
    return changes


def training_finished(checkpoint: Path, changed_keys: list[str]) -> bool:
    """Return True when ``checkpoint`` is the final step of a run whose length was not changed.

    The transformers 5.25 Trainer, resumed from its final checkpoint, trains one step past
    ``max_steps``, so a finished run must not be handed back to it.
    """
    if {"train.max_steps", "train.epochs"} & set(changed_keys):
        return False
    state = read_trainer_state(checkpoint)
    return state["global_step"] >= state["max_steps"]


def load_adapter_weights(model, checkpoint: Path) -> None:
    """Copy a checkpoint's LoRA weights into a ``PeftModel`` with the same adapter layout."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / ADAPTER_WEIGHTS_FILE)))
    if result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: {len(result.unexpected_keys)} adapter weights do not match the model, "
            f"e.g. {result.unexpected_keys[0]}"
        )
