"""The run folder: what training writes, and what later commands read back.

Layout of a run folder::

    loratune.json        base model reference, family, prompt format, chosen max lengths
    config.yaml          the resolved recipe, every default written out
    data_stats.json      rows kept and dropped per split, token length statistics
    adapter/             PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    checkpoints/         Trainer checkpoints (checkpoint-<step>/), used by --resume
    logs/                TensorBoard event files
    train_log.jsonl      one JSON object per logged training step
    eval/<name>/         predictions.jsonl and metrics.json for each evaluation
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

INFO_FILE = "loratune.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
TRAIN_LOG_FILE = "train_log.jsonl"
DATA_STATS_FILE = "data_stats.json"
EVAL_DIR = "eval"


@dataclass
class RunInfo:
    """Facts about a run that merge, evaluate, predict and serve need."""

    base_model: str
    family: str
    prompt: dict
    max_source_length: int
    max_target_length: int
    quantization: str = "none"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    loratune_version: str = ""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    A reader sees the old file or the new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only. The mode a plain open() would
        # give lets other users read the run's files.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_plain_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain open() would give it.

    safetensors writes its files readable by their owner only (mode 0600), unlike the JSON
    and tokenizer files next to them.
    """
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_run_info(run_dir: Path, info: RunInfo) -> None:
    write_json_atomic(Path(run_dir) / INFO_FILE, asdict(info))


def is_run_dir(path: Path) -> bool:
    return (Path(path) / INFO_FILE).is_file()


def load_run_info(run_dir: Path) -> RunInfo:
    """Read ``loratune.json`` from a run folder."""
    path = Path(run_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a loratune run folder: {INFO_FILE} not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    known = set(RunInfo.__dataclass_fields__)
    return RunInfo(**{key: value for key, value in data.items() if key in known})


class RunLockedError(RuntimeError):
    """Raised when another process is training into the same run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` while the block runs.

    The lock is a file next to the folder (``.NAME.lock``), so that replacing the folder does
    not drop it. The operating system releases it when the process ends, even after SIGKILL.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunLockedError(
                f"another loratune process (pid {owner}) is training into {run_dir}; wait for it to "
                "finish or choose another train.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
