"""loratune merge: the merged model must compute what base + adapter computes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import pytest
import torch

from loratune.cli.main import main
from loratune.config import ModelConfig
from loratune.data.formatting import encode_prompt
from loratune.data.loading import DEMO_DIR, read_rows
from loratune.evaluate.generation import _pad_batch
from loratune.evaluate.pipeline import evaluate_run, run_config
from loratune.export.merge import MergeError, merge_run
from loratune.models.inference import (
    load_base_for_inference,
    load_for_inference,
    load_run_for_inference,
    read_merge_record,
)
from loratune.runs import CONFIG_FILE, INFO_FILE


def _demo_batch(loaded, count: int = 4) -> dict[str, torch.Tensor]:
    texts = [row["dialogue"] for row in read_rows(DEMO_DIR / "test.jsonl")[:count]]
    prompts = [encode_prompt(loaded.tokenizer, loaded.prompt, text, 64)[0] for text in texts]
    return _pad_batch(prompts, loaded.tokenizer.pad_token_id, left=loaded.family == "causal")


@torch.no_grad()
def _logits(loaded, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if loaded.family == "seq2seq":
        decoder_ids = torch.full((batch["input_ids"].shape[0], 5), loaded.tokenizer.pad_token_id)
        decoder_ids[:, 1:] = batch["input_ids"][:, :4]
        return loaded.model(**batch, decoder_input_ids=decoder_ids).logits
    logits = loaded.model(**batch).logits
    # Padded positions are masked out of attention but still produce (meaningless) logits.
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("run_fixture", ["llama_run", "t5_run"])
def test_merged_logits_match_adapter(run_fixture, request, tmp_path):
    run_dir = request.getfixturevalue(run_fixture)
    with_adapter = load_run_for_inference(run_dir, merge=False)
    batch = _demo_batch(with_adapter)
    expected = _logits(with_adapter, batch)
    base = load_base_for_inference(ModelConfig(name_or_path=with_adapter.base_model), "{text}", None)
    base_logits = _logits(base, batch)

    out_dir = merge_run(run_dir, tmp_path / "merged")
    merged = load_for_inference(str(out_dir))
    actual = _logits(merged, batch)

    assert merged.adapter is None
    assert type(merged.model).__name__ == type(base.model).__name__
    # The adapter must matter, or equal logits would prove nothing.
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("run_fixture", ["llama_run", "t5_run"])
def test_inference_merges_in_memory(run_fixture, request):
    run_dir = request.getfixturevalue(run_fixture)
    unmerged = load_run_for_inference(run_dir, merge=False)
    merged = load_run_for_inference(run_dir)
    batch = _demo_batch(unmerged)

    assert any("lora_" in name for name, _ in unmerged.model.named_parameters())
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    assert merged.adapter == unmerged.adapter
    torch.testing.assert_close(_logits(merged, batch), _logits(unmerged, batch), atol=1e-5, rtol=1e-5)


def test_merged_folder_contents(llama_run, tmp_path):
    out_dir = merge_run(llama_run, tmp_path / "merged")

    names = {path.name for path in out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", INFO_FILE, CONFIG_FILE} <= names
    assert not any(name.startswith("adapter") for name in names)
    info = json.loads((out_dir / INFO_FILE).read_text())
    assert info["quantization"] == "none"
    assert info["prompt"] == json.loads((llama_run / INFO_FILE).read_text())["prompt"]
    record = read_merge_record(out_dir)
    assert record["base_quantization"] == "none"
    assert record["run_dir"] == str(llama_run.resolve())
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 8
    assert generation["do_sample"] is False
    assert not (tmp_path / ".merged.tmp").exists()


def test_evaluate_merged_matches_run(llama_run, tmp_path):
    merged = merge_run(llama_run, tmp_path / "merged")
    config = run_config(llama_run, ["eval.max_samples=100"])

    from_run = evaluate_run(llama_run, config, "test", tmp_path / "eval-run")["tuned"]
    from_merged = evaluate_run(merged, run_config(merged, ["eval.max_samples=100"]), "test", tmp_path / "eval-merged")["tuned"]

    assert from_merged["adapter"] is None
    assert from_merged["model"] == str(merged)
    assert from_merged["prompt"] == from_run["prompt"]
    predictions_run = (tmp_path / "eval-run" / "predictions.jsonl").read_text()
    predictions_merged = (tmp_path / "eval-merged" / "predictions.jsonl").read_text()
    assert [json.loads(line)["prediction"] for line in predictions_merged.splitlines()] == [
        json.loads(line)["prediction"] for line in predictions_run.splitlines()
    ]


def test_merge_of_merged_is_noop(llama_run, tmp_path, capsys):
    merged = merge_run(llama_run, tmp_path / "merged")
    assert merge_run(merged, tmp_path / "again") is None
    assert not (tmp_path / "again").exists()

    assert main(["merge", str(merged), "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{merged} is already a merged model; nothing to do, and nothing was written to {tmp_path / 'again'}. "
        f"Use {merged} as it is, or copy it."
    )
    assert not (tmp_path / "again").exists()


def test_merge_rejects_bad_output(llama_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_run(llama_run, busy)
    assert (busy / "keep.txt").exists()
    with pytest.raises(MergeError, match="inside the run folder"):
        merge_run(llama_run, llama_run / "merged")
    assert merge_run(llama_run, busy, overwrite=True) == busy
    assert not (busy / "keep.txt").exists()


def test_merge_quantized_run_uses_full_precision(llama_run, tmp_path, caplog):
    run_dir = tmp_path / "run-int8"
    shutil.copytree(llama_run, run_dir)
    info = json.loads((run_dir / INFO_FILE).read_text())
    (run_dir / INFO_FILE).write_text(json.dumps({**info, "quantization": "int8"}))

    with caplog.at_level(logging.WARNING, logger="loratune.export.merge"):
        out_dir = merge_run(run_dir, tmp_path / "merged")

    assert "int8-quantized base" in caplog.text
    assert "unquantized" in caplog.text
    assert read_merge_record(out_dir)["base_quantization"] == "int8"
    assert json.loads((out_dir / INFO_FILE).read_text())["quantization"] == "none"
    assert next(load_for_inference(str(out_dir)).model.parameters()).dtype == torch.float32


def test_merge_cli_errors(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a loratune run folder" in capsys.readouterr().err


def test_describe_target_merge_state(llama_run, tiny_llama_dir, tmp_path):
    from loratune.export.target import describe_target

    merged_dir = merge_run(llama_run, tmp_path / "merged")
    cases = {
        str(llama_run): (True, "run folder, adapter merged in memory"),
        str(merged_dir): (True, "merged folder"),
        str(tiny_llama_dir): (False, "base model"),
    }
    for target, (merged, source) in cases.items():
        description = describe_target(target, load_for_inference(target))
        assert description["merged"] is merged, target
        assert description["loaded_from"] == source, target


def test_merged_weights_use_umask_mode(llama_run, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    merged_dir = merge_run(llama_run, tmp_path / "merged")
    weights = list(merged_dir.glob("*.safetensors"))
    assert weights
    for path in weights:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
