import json

import pytest
import torch

from loratune.config import GenerationSettings, ModelConfig
from loratune.data.loading import Example
from loratune.evaluate.generation import _new_token_ids
from loratune.evaluate.rouge import rouge_scores
from loratune.evaluate.runner import evaluate_examples, format_comparison
from loratune.models.inference import load_base_for_inference

EXAMPLES = [
    Example("x1", "anna : are you coming to the party tonight ?", ["they talk about the party"]),
    Example("x2", "ben : the train is late again", ["the train is late", "ben waits for the train"]),
    Example("x3", "carla : i bought the tickets", ["carla bought tickets"]),
]


@pytest.mark.parametrize("fixture", ["tiny_t5_dir", "tiny_llama_dir"])
def test_predictions_and_metrics_files(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    loaded = load_base_for_inference(ModelConfig(name_or_path=str(model_dir)), "summarize : {text}", 64)
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    metrics = evaluate_examples(loaded, EXAMPLES, settings, tmp_path, "test", "fixture")

    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["x1", "x2", "x3"]
    assert rows[1]["references"] == ["the train is late", "ben waits for the train"]
    assert set(rows[0]) == {"id", "input", "references", "prediction", "new_tokens", "rouge"}
    assert all(row["new_tokens"] <= 6 for row in rows)

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    expected = rouge_scores([row["prediction"] for row in rows], [ex.references for ex in EXAMPLES])
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, abs=1e-3), key
    assert saved["num_examples"] == 3
    assert saved["split"] == "test"
    assert saved["model"] == str(model_dir)
    assert saved["adapter"] is None
    assert saved["decoding"]["max_new_tokens"] == 6
    assert saved["decoding"]["do_sample"] is False


def test_ignore_index_in_output_is_not_decoded():
    output = torch.tensor([[5, 6, 7, -100, -100]])
    assert _new_token_ids(output, 2, "causal", pad_id=0) == [[7, 0, 0]]
    assert _new_token_ids(output, 2, "seq2seq", pad_id=0) == [[6, 7, 0, 0]]


def test_comparison_table_lists_each_model():
    metrics = {"rouge1": 40.0, "rouge2": 14.0, "rougeL": 30.0, "rougeLsum": 35.0, "num_examples": 100}
    table = format_comparison({"base": {**metrics, "rouge1": 24.6}, "tuned": metrics})
    lines = table.splitlines()
    assert lines[0].split() == ["model", "rouge1", "rouge2", "rougeL", "rougeLsum", "examples"]
    assert lines[1].split()[:2] == ["base", "24.60"]
    assert lines[2].split()[:2] == ["tuned", "40.00"]
