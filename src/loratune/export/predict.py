"""Summarize every row of a JSONL, JSON, CSV or Parquet file with batched generation.

Output is JSONL, one object per input row in input order::

    {"id": "13862856", "prediction": "...", "prompt_tokens": 212, "new_tokens": 23, "input_truncated": false}

Finished batches are appended to ``<output>.partial`` and flushed to disk one batch at a time.
Only when every row is done is the output written (through a temporary file and a rename) and
the partial file removed. A crash or Ctrl-C therefore leaves the previous output untouched and
a partial file of whole lines, which ``resume=True`` continues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from loratune.config import GenerationSettings
from loratune.data.formatting import encode_prompt
from loratune.data.loading import DataError, clean_text, read_rows
from loratune.evaluate.generation import generate, plan_batches
from loratune.models.inference import InferenceModel
from loratune.runs import write_text_atomic

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class PredictOutputError(RuntimeError):
    """Raised when the output or partial file is in the way of a new prediction run."""


@dataclass
class InputRow:
    """One row to summarize: its id, position in the file, and cleaned text."""

    id: str
    index: int
    text: str


@dataclass
class PredictReport:
    """Row counts and timing of one ``predict_file`` call."""

    rows: int
    resumed: int
    generated: int
    skipped_empty: int
    truncated: int
    seconds: float
    output: Path


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def read_input_rows(path: Path, text_column: str, id_column: str | None, id_column_required: bool) -> list[InputRow]:
    """Read the input file and return its rows with ids; ids must be unique.

    When ``id_column`` is missing from the file and not ``id_column_required``, rows are
    numbered from 0 in file order, as ``loratune evaluate`` numbers them.
    """
    rows = read_rows(Path(path))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    if text_column not in rows[0]:
        raise DataError(
            f"{path}: text column {text_column!r} not found; available columns: {sorted(rows[0])}. "
            "Set it with --text-column."
        )
    use_ids = id_column is not None and id_column in rows[0]
    if id_column is not None and not use_ids:
        if id_column_required:
            raise DataError(f"{path}: id column {id_column!r} not found; available columns: {sorted(rows[0])}")
        logger.info("%s has no %r column; numbering rows from 0 as ids", path, id_column)

    result, seen = [], set()
    for index, row in enumerate(rows):
        value = row.get(id_column) if use_ids else index
        if value is None:
            raise DataError(f"{path}: row {index + 1}: the id column {id_column!r} is empty")
        row_id = str(value)
        if row_id in seen:
            raise DataError(
                f"{path}: row {index + 1}: duplicate id {row_id!r}; ids must be unique so that "
                "outputs can be matched to rows. Pick a unique column with --id-column."
            )
        seen.add(row_id)
        text = row.get(text_column)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: row {index + 1}: column {text_column!r} must be text, got {type(text).__name__}")
        result.append(InputRow(row_id, index, clean_text(text or "")))
    return result


def read_partial(path: Path, known_ids: set[str]) -> dict[str, dict]:
    """Load the finished records of a partial file, keyed by id.

    A last line without its newline, or one that is not valid JSON, comes from a write that
    was cut off. It is removed from the file, so its rows are generated again.
    """
    done: dict[str, dict] = {}
    valid_bytes = 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "id" not in record:
                break
            if record["id"] not in known_ids:
                raise PredictOutputError(
                    f"{path} contains id {record['id']!r}, which is not in the input file; it was "
                    "written for another input. Delete it or choose another --output."
                )
            done[record["id"]] = record
            valid_bytes += len(line)
    if valid_bytes < path.stat().st_size:
        logger.warning("Removing an incomplete last line from %s (a write was cut off)", path)
        with path.open("r+b") as handle:
            handle.truncate(valid_bytes)
    return done


def _append_records(handle, records: Sequence[dict]) -> None:
    handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    handle.flush()
    os.fsync(handle.fileno())


def _generate_pending(
    loaded: InferenceModel, pending: list[InputRow], settings: GenerationSettings, handle, bar
) -> int:
    """Generate summaries for ``pending`` rows batch by batch, appending each batch to ``handle``.

    Returns the number of inputs that were cut to the max source length.
    """
    prompts, truncated = {}, 0
    for row in pending:
        ids, cut = encode_prompt(loaded.tokenizer, loaded.prompt, row.text, loaded.max_source_length)
        prompts[row.id] = (ids, cut)
        truncated += cut
    # The batches evaluation forms, so a full run with the same generation settings and
    # greedy decoding gives the same text as `loratune evaluate`.
    lengths = [len(prompts[row.id][0]) for row in pending]
    for indices in plan_batches(lengths, settings.batch_size, settings.batch_tokens):
        batch = [pending[i] for i in indices]
        outputs = generate(
            loaded.model, loaded.tokenizer, [prompts[row.id][0] for row in batch], loaded.family, settings
        )
        records = [
            {
                "id": row.id,
                "prediction": output.text,
                "prompt_tokens": output.prompt_tokens,
                "new_tokens": output.new_tokens,
                "input_truncated": prompts[row.id][1],
            }
            for row, output in zip(batch, outputs)
        ]
        _append_records(handle, records)
        bar.update(len(batch))
    return truncated


def prepare_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Check that writing ``output`` (and its partial file) is allowed."""
    partial = partial_path(output)
    if output.suffix.lower() != ".jsonl":
        raise PredictOutputError(f"--output {output}: predictions are written as JSON Lines; use a .jsonl name")
    if output.exists() and not overwrite:
        raise PredictOutputError(f"{output} already exists; pass --overwrite to replace it")
    if partial.exists() and not resume:
        raise PredictOutputError(
            f"{partial} contains the rows of an unfinished run; pass --resume to continue it, "
            "or delete it to start again"
        )
    if resume and not partial.exists():
        logger.info("--resume: %s not found; starting from the first row", partial)


def predict_file(
    loaded: InferenceModel,
    input_path: Path,
    output: Path,
    settings: GenerationSettings,
    text_column: str = "dialogue",
    id_column: str | None = "id",
    id_column_required: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> PredictReport:
    """Summarize every row of ``input_path`` and write JSONL predictions to ``output``."""
    output = Path(output)
    partial = partial_path(output)
    prepare_output(output, resume, overwrite)
    rows = read_input_rows(Path(input_path), text_column, id_column, id_column_required)
    done = read_partial(partial, {row.id for row in rows}) if resume and partial.exists() else {}
    if done:
        logger.info("Resuming: %d of %d rows already in %s", len(done), len(rows), partial)

    # Empty inputs get a record without a prediction, so every input row has one output line.
    empty = [row for row in rows if not row.text and row.id not in done]
    pending = [row for row in rows if row.text and row.id not in done]
    start = time.perf_counter()
    truncated = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as handle, tqdm(
        total=len(rows), initial=len(done), desc="predict", unit="row"
    ) as bar:
        if empty:
            logger.warning("%d rows have an empty %r column; they get no prediction", len(empty), text_column)
            _append_records(handle, [{"id": row.id, "prediction": None, "skipped": "empty input"} for row in empty])
            bar.update(len(empty))
        try:
            truncated = _generate_pending(loaded, pending, settings, handle, bar)
        except KeyboardInterrupt:
            logger.warning("Interrupted; finished rows are in %s. Run again with --resume to continue.", partial)
            raise
    seconds = time.perf_counter() - start
    if truncated:
        logger.warning("%d of %d inputs were cut to %s tokens", truncated, len(pending), loaded.max_source_length)

    # Every row is done: write the output in input order, then drop the partial file.
    records = read_partial(partial, {row.id for row in rows})
    missing = [row.id for row in rows if row.id not in records]
    if missing:
        raise PredictOutputError(f"{partial} lacks {len(missing)} rows (first id {missing[0]!r}); run again with --resume")
    text = "".join(json.dumps(records[row.id], ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(output, text)
    partial.unlink()
    logger.info("Wrote %d %s to %s", len(rows), "prediction" if len(rows) == 1 else "predictions", output)
    return PredictReport(len(rows), len(done), len(pending), len(empty), truncated, seconds, output)
