"""loratune predict: batched summaries that keep row ids and survive interruption."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import loratune.export.predict as predict_module
from loratune.cli.main import main
from loratune.config import GenerationSettings, load_config
from loratune.data.loading import DEMO_DIR, DataError, read_rows
from loratune.evaluate.pipeline import evaluate_run
from loratune.export.merge import merge_run
from loratune.export.predict import PredictOutputError, partial_path, predict_file
from loratune.models.inference import load_for_inference
from loratune.runs import CONFIG_FILE

DEMO_TEST = DEMO_DIR / "test.jsonl"
SETTINGS = GenerationSettings(max_new_tokens=8, batch_size=4)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _predictions(path: Path) -> dict[str, str]:
    return {record["id"]: record["prediction"] for record in _read_jsonl(path)}


@pytest.fixture(scope="module")
def loaded_run(llama_run):
    return load_for_inference(str(llama_run))


@pytest.fixture(scope="module")
def reference_output(loaded_run, tmp_path_factory) -> Path:
    """Predictions for the demo test file in one uninterrupted run."""
    output = tmp_path_factory.mktemp("reference") / "predictions.jsonl"
    predict_file(loaded_run, DEMO_TEST, output, SETTINGS)
    return output


def test_predict_keeps_ids_in_input_order(reference_output):
    records = _read_jsonl(reference_output)

    assert [record["id"] for record in records] == [row["id"] for row in read_rows(DEMO_TEST)]
    assert set(records[0]) == {"id", "prediction", "prompt_tokens", "new_tokens", "input_truncated"}
    assert all(record["new_tokens"] > 0 for record in records)
    assert any(record["prediction"] for record in records)
    assert not partial_path(reference_output).exists()


def test_predict_matches_evaluate(llama_run, reference_output, tmp_path):
    config = load_config(llama_run / CONFIG_FILE, ["eval.max_samples=100"])
    evaluate_run(llama_run, config, "test", tmp_path / "eval")

    evaluated = _predictions(tmp_path / "eval" / "predictions.jsonl")
    assert evaluated == _predictions(reference_output)


def test_predict_seq2seq_matches_evaluate(t5_run, tmp_path):
    config = load_config(t5_run / CONFIG_FILE, ["eval.max_samples=100"])
    evaluate_run(t5_run, config, "test", tmp_path / "eval")
    output = tmp_path / "t5.jsonl"

    predict_file(load_for_inference(str(t5_run)), DEMO_TEST, output, SETTINGS)

    predictions = _predictions(output)
    assert predictions == _predictions(tmp_path / "eval" / "predictions.jsonl")
    assert any(predictions.values())


def test_predict_reads_csv_and_parquet(loaded_run, reference_output, tmp_path):
    rows = read_rows(DEMO_TEST)
    csv_path = tmp_path / "input.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerows(rows)
    parquet_path = tmp_path / "input.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)

    for source in (csv_path, parquet_path):
        output = tmp_path / f"{source.suffix[1:]}.jsonl"
        predict_file(loaded_run, source, output, SETTINGS)
        assert output.read_text() == reference_output.read_text(), source.suffix


def test_interrupted_predict_resumes(loaded_run, reference_output, tmp_path, monkeypatch):
    output = tmp_path / "predictions.jsonl"
    real_generate = predict_module.generate
    calls = {"count": 0}

    def interrupt_second_batch(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(predict_module, "generate", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_file(loaded_run, DEMO_TEST, output, SETTINGS)

    assert not output.exists()
    partial = _read_jsonl(partial_path(output))
    assert len(partial) == SETTINGS.batch_size
    with pytest.raises(PredictOutputError, match="--resume"):
        predict_file(loaded_run, DEMO_TEST, output, SETTINGS)

    monkeypatch.setattr(predict_module, "generate", real_generate)
    report = predict_file(loaded_run, DEMO_TEST, output, SETTINGS, resume=True)

    assert report.resumed == SETTINGS.batch_size
    assert report.generated == 12 - SETTINGS.batch_size
    assert output.read_text() == reference_output.read_text()
    assert not partial_path(output).exists()


def test_resume_drops_cut_off_line(loaded_run, reference_output, tmp_path):
    output = tmp_path / "predictions.jsonl"
    lines = reference_output.read_text().splitlines(keepends=True)
    partial_path(output).write_text("".join(lines[:3]) + lines[3][:20])

    report = predict_file(loaded_run, DEMO_TEST, output, SETTINGS, resume=True)

    assert report.resumed == 3
    assert output.read_text() == reference_output.read_text()


def test_predict_rejects_foreign_partial(loaded_run, tmp_path):
    output = tmp_path / "predictions.jsonl"
    partial_path(output).write_text(json.dumps({"id": "other-file-7", "prediction": "x"}) + "\n")
    with pytest.raises(PredictOutputError, match="other-file-7"):
        predict_file(loaded_run, DEMO_TEST, output, SETTINGS, resume=True)


def test_predict_output_checks(loaded_run, reference_output, tmp_path):
    with pytest.raises(PredictOutputError, match="already exists"):
        predict_file(loaded_run, DEMO_TEST, reference_output, SETTINGS)
    with pytest.raises(PredictOutputError, match=".jsonl"):
        predict_file(loaded_run, DEMO_TEST, tmp_path / "out.csv", SETTINGS)


def test_predict_input_checks(loaded_run, tmp_path):
    path = tmp_path / "input.jsonl"
    path.write_text('{"key": "a", "text": "hello"}\n{"key": "a", "text": "again"}\n')
    output = tmp_path / "out.jsonl"

    with pytest.raises(DataError, match="'dialogue' not found"):
        predict_file(loaded_run, path, output, SETTINGS)
    with pytest.raises(DataError, match="duplicate id 'a'"):
        predict_file(loaded_run, path, output, SETTINGS, text_column="text", id_column="key")
    with pytest.raises(DataError, match="'row_id' not found"):
        predict_file(loaded_run, path, output, SETTINGS, text_column="text", id_column="row_id", id_column_required=True)


def test_predict_numbers_rows_and_skips_empty(loaded_run, tmp_path):
    path = tmp_path / "input.jsonl"
    path.write_text('{"text": "hello there"}\n{"text": "  "}\n{"text": "see you"}\n')
    output = tmp_path / "out.jsonl"

    report = predict_file(loaded_run, path, output, SETTINGS, text_column="text")

    records = _read_jsonl(output)
    assert [record["id"] for record in records] == ["0", "1", "2"]
    assert records[1] == {"id": "1", "prediction": None, "skipped": "empty input"}
    assert records[0]["new_tokens"] > 0
    assert report.skipped_empty == 1


def test_predict_cli_on_merged_model(llama_run, reference_output, tmp_path, capsys):
    merged = merge_run(llama_run, tmp_path / "merged")
    output = tmp_path / "merged.jsonl"

    code = main(["predict", str(merged), "--input", str(DEMO_TEST), "--output", str(output), "--batch-size", "4"])

    assert code == 0
    assert "Wrote 12 predictions" in capsys.readouterr().out
    assert _predictions(output) == _predictions(reference_output)


def test_predict_cli_errors(llama_run, tmp_path, capsys):
    args = ["predict", str(llama_run), "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert "data file not found" in capsys.readouterr().err


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_leaves_valid_partial_file(llama_run, tmp_path):
    rows = read_rows(DEMO_TEST) * 40
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps({**row, "id": f"{row['id']}-{i}"}) + "\n" for i, row in enumerate(rows)))
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "loratune.cli.main", "predict", str(llama_run), "--input", str(source),
               "--output", str(output), "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A background job of a non-interactive shell starts with SIGINT ignored, so Python would
    # raise no KeyboardInterrupt. The child therefore gets the default action back first.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=_default_sigint)
    partial = partial_path(output)
    deadline = time.monotonic() + 60
    while (not partial.exists() or partial.stat().st_size == 0) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr.decode()[-2000:]
    assert not output.exists()
    records = _read_jsonl(partial)
    assert 0 < len(records) < len(rows)
    assert partial.read_bytes().endswith(b"\n")
