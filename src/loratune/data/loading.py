"""Read dataset splits from the Hub, a folder of split files, or one local file.

Every row becomes an ``Example``: an id, the input text and one or more reference summaries.
Text is cleaned the same way for every source: ``\\r\\n`` becomes ``\\n``, surrounding
whitespace is stripped, and rows whose input or summary is empty are dropped and counted.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratune.config import DataConfig

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEMO_SOURCE = "demo"
DEMO_DIR = Path(__file__).parent / "demo"
SKIP_HINT = "set data.skip_bad_rows=true to skip such rows with a count"


class DataError(ValueError):
    """Raised when a data source, split, row or column is invalid."""


@dataclass
class Example:
    """One input text and its reference summaries."""

    id: str
    text: str
    references: list[str]

    @property
    def target(self) -> str:
        """The summary used as the training target (the first reference)."""
        return self.references[0]


@dataclass
class SplitReport:
    """Row counts of one split before and after cleaning, with the reasons for each drop."""

    split: str
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    # Usable rows before a row limit cut them to ``rows_kept``; None without a limit.
    rows_usable: int | None = None

    def summary(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_usable": self.rows_kept if self.rows_usable is None else self.rows_usable,
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
        }

    def describe(self) -> str:
        if self.rows_usable is not None and self.rows_usable > self.rows_kept:
            text = (f"{self.split}: first {self.rows_kept} of {self.rows_usable} usable rows taken "
                    f"(row limit) from {self.source}, {self.rows_read} rows read")
        else:
            text = f"{self.split}: {self.rows_kept} of {self.rows_read} rows kept from {self.source}"
        if self.dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
            text += f" (dropped: {reasons})"
        return text


def clean_text(value: str) -> str:
    """Normalise line endings and strip surrounding whitespace."""
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_jsonl(path: Path, bad_lines: list[int] | None = None) -> list[dict]:
    """Read one JSON object per line.

    A malformed line (invalid UTF-8 or JSON, or not an object) raises ``DataError`` naming its
    number, unless ``bad_lines`` is a list: then the line is skipped and its number appended.
    """
    rows = []
    try:
        handle = path.open("rb")  # decoded line by line, so that an encoding error has a line number
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            row, problem = _parse_json_line(raw)
            if row is not None:
                rows.append(row)
            elif problem is None:
                continue  # blank line
            elif bad_lines is None:
                raise DataError(f"{path}: line {number}: {problem}; {SKIP_HINT}")
            else:
                bad_lines.append(number)
    return rows


def _parse_json_line(raw: bytes) -> tuple[dict | None, str | None]:
    """Return (row, None) for a JSON object, (None, problem) for a bad line, (None, None) if blank."""
    try:
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 text (byte {error.start} of the line)"
    if not line.strip():
        return None, None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg}, column {error.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def _open_text(path: Path):
    try:
        handle = path.open(encoding="utf-8")
        handle.read(1 << 16)  # surfaces an encoding error before any row is parsed
        handle.seek(0)
        return handle
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None


def read_json(path: Path) -> list[dict]:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            if error.msg == "Extra data":
                # A .json file that holds one object per line.
                return read_jsonl(path)
            raise DataError(f"{path}: line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 text (byte {error.start})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    return data


def read_csv(path: Path) -> list[dict]:
    with _open_text(path) as handle:
        try:
            return list(csv.DictReader(handle))
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{path}: invalid CSV ({error})") from None


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot be read as Parquet ({error})") from None


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_rows(path: Path, bad_lines: list[int] | None = None) -> list[dict]:
    """Read a local JSON, JSONL, CSV or Parquet file into a list of dicts.

    With ``bad_lines`` given, malformed lines of a JSON Lines file are skipped and their numbers
    are appended to it (see ``read_jsonl``). Other formats still fail as a whole.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    if reader is read_jsonl:
        return read_jsonl(path, bad_lines)
    return reader(path)


def split_files(folder: Path) -> dict[str, Path]:
    """Map split names to files in ``folder`` (``train.jsonl``, ``test.csv`` ...)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in FILE_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    # SAMSum and other sets ship "val" files; accept them as "validation".
    if "validation" not in found and "val" in found:
        found["validation"] = found["val"]
    return found


def _references(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    if value is None:
        return []
    raise DataError(
        f"{where}: column {key!r} must be text or a list of texts, got {type(value).__name__}; {SKIP_HINT}"
    )


def to_examples(rows: list[dict], config: DataConfig, report: SplitReport) -> list[Example]:
    """Map columns, clean text and drop unusable rows, counting each reason in ``report``."""
    report.rows_read = len(rows)
    if rows:
        _check_columns(rows[0], config, report.source)
    examples = []
    for index, row in enumerate(rows):
        where = f"{report.source}: row {index + 1}"
        try:
            text = row.get(config.text_column)
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{where}: column {config.text_column!r} must be text, got {type(text).__name__}; {SKIP_HINT}"
                )
            raw_references = _references(row.get(config.summary_column), config.summary_column, where)
        except DataError:
            if not config.skip_bad_rows:
                raise
            report.dropped["wrong column type"] += 1
            continue
        references = [clean_text(r) for r in raw_references]
        references = [r for r in references if r]
        text = clean_text(text or "")
        if not text:
            report.dropped["empty input"] += 1
            continue
        if not references:
            report.dropped["empty summary"] += 1
            continue
        row_id = row.get(config.id_column) if config.id_column else None
        examples.append(Example(str(row_id) if row_id is not None else str(index), text, references))
    report.rows_kept = len(examples)
    return examples


def _check_columns(row: dict, config: DataConfig, source: str) -> None:
    wanted = [config.text_column, config.summary_column]
    missing = [name for name in wanted if name not in row]
    if missing:
        raise DataError(
            f"{source}: column(s) {missing} not found; available columns: {sorted(row)}. "
            "Set data.text_column and data.summary_column."
        )


def _rows_from_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        available = datasets.get_dataset_split_names(source)
    except Exception as error:  # datasets wraps network and lookup failures in many types
        raise DataError(
            f"data source {source!r} is not a local file or folder, and the Hub dataset could "
            f"not be loaded ({type(error).__name__}). Point data.source at a local file or a folder "
            "of train/validation/test files (--data DIR for quickstart and evaluate)."
        ) from None
    if split not in available:
        raise DataError(f"{source}: split {split!r} not found; available splits: {available}")
    return datasets.load_dataset(source, split=split).to_list()


def load_split(config: DataConfig, split: str, limit: int | None = None) -> tuple[list[Example], SplitReport]:
    """Load, clean and truncate one split of the configured source."""
    source = str(DEMO_DIR) if config.source == DEMO_SOURCE else config.source
    path = Path(source).expanduser()
    bad_lines: list[int] | None = [] if config.skip_bad_rows else None
    if not path.exists() and path.suffix.lower() not in FILE_SUFFIXES and source.startswith(("/", ".", "~")):
        raise DataError(f"data source not found: {path}")
    if path.is_dir():
        files = split_files(path)
        if split not in files:
            raise DataError(f"{path}: split {split!r} not found; available splits: {sorted(files)}")
        rows, origin = read_rows(files[split], bad_lines), str(files[split])
    elif path.suffix.lower() in FILE_SUFFIXES or path.exists():
        # A single file serves every split that is asked for.
        rows, origin = read_rows(path, bad_lines), str(path)
    else:
        rows, origin = _rows_from_hub(source, split), f"{source} (Hub)"
    report = SplitReport(split, origin)
    examples = to_examples(rows, config, report)
    if bad_lines:
        report.rows_read += len(bad_lines)
        report.dropped["malformed JSON line"] += len(bad_lines)
        shown = ", ".join(str(number) for number in bad_lines[:10])
        more = f" and {len(bad_lines) - 10} more" if len(bad_lines) > 10 else ""
        logger.warning("%s: skipped %d malformed lines (line %s%s)", origin, len(bad_lines), shown, more)
    if limit is not None:
        report.rows_usable = len(examples)
        examples = examples[:limit]
        report.rows_kept = len(examples)
    logger.info(report.describe())
    if not examples:
        raise DataError(f"{origin}: split {split!r} has no usable rows after cleaning ({report.describe()})")
    return examples, report
