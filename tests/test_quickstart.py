"""The quickstart path on the real embedded SmolLM2-135M-Instruct (slow: about a minute)."""

import json
import logging

import pytest

from loratune.cli.main import main
from loratune.cli.quickstart import resolve_data_source
from loratune.data.loading import DEMO_SOURCE


def test_offline_quickstart_falls_back_to_demo_set(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_data_source(None) == DEMO_SOURCE
    assert "Hub is unreachable" in caplog.text
    assert "pass --data DIR" in caplog.text


def test_data_flag_wins(tmp_path):
    assert resolve_data_source(str(tmp_path)) == str(tmp_path)


@pytest.mark.integration
def test_quickstart_end_to_end(real_samsum_dir, tmp_path, capsys):
    data = str(real_samsum_dir) if real_samsum_dir else DEMO_SOURCE
    run_dir = tmp_path / "quickstart"
    overrides = ["data.max_train_samples=16", "data.max_source_length=160", "data.max_target_length=32",
                 "train.max_steps=3", "train.batch_size=4", "train.logging_steps=1", "eval.max_samples=4",
                 "generation.max_new_tokens=24", "generation.batch_size=4"]
    assert main(["quickstart", "--data", data, "--output", str(run_dir), *overrides]) == 0

    output = capsys.readouterr().out
    assert "base (zero-shot)" in output
    assert "LoRA fine-tuned" in output
    info = json.loads((run_dir / "loratune.json").read_text())
    assert info["base_model"] == "embedded:smollm2-135m-instruct"
    assert info["prompt"]["use_chat_template"] is True
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    losses = [row["loss"] for row in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 3
    assert all(0 < loss < 10 for loss in losses)

    test_ids = None
    for name in ("base", "tuned"):
        folder = run_dir / "eval" / "test" / name
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["num_examples"] == 4
        assert 0 < metrics["rouge1"] <= 100, name
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        ids = [row["id"] for row in rows]
        assert test_ids in (None, ids)
        test_ids = ids
        assert all(row["prediction"] for row in rows), name
    if real_samsum_dir:
        first = json.loads((real_samsum_dir / "test.jsonl").read_text().splitlines()[0])
        assert test_ids[0] == first["id"]
