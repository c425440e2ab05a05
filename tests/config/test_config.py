from pathlib import Path

import pytest
import yaml

from loratune.cli.quickstart import QUICKSTART_RECIPE
from loratune.config import ConfigError, build_config, dump_config, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_valid():
    config = build_config({})
    assert config.lora.r == 16
    assert config.model.name_or_path == "embedded:smollm2-135m-instruct"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key \(value 8\)"):
        build_config({"lora": {"rank": 8}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        build_config({"trainer": {"epochs": 1}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*\(got 'eight'\)"):
        build_config({"train": {"batch_size": "eight"}})


def test_out_of_range_values_are_rejected():
    cases = [
        ({"lora": {"r": 0}}, r"lora\.r: Input should be greater than 0"),
        ({"lora": {"dropout": 1.0}}, r"lora\.dropout: Input should be less than 1"),
        ({"train": {"learning_rate": -1e-4}}, r"train\.learning_rate: Input should be greater than 0"),
        ({"model": {"quantization": "int3"}}, r"model\.quantization: Input should be 'none', 'int8' or 'int4'"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            build_config(data)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as caught:
        build_config({"lora": {"r": -1, "alhpa": 3}, "train": {"epochs": "many"}})
    message = str(caught.value)
    assert "lora.r" in message
    assert "lora.alhpa: unknown key" in message
    assert "train.epochs" in message


def test_prompt_needs_text_placeholder():
    with pytest.raises(ConfigError, match=r"data\.prompt: must contain '\{text\}'"):
        build_config({"data": {"prompt": "Summarize:"}})


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  epochs: 2\n")
    config = load_config(path, ["train.epochs=3", "lora.target_modules=[q, v]", "data.max_train_samples=10"])
    assert config.train.epochs == 3
    assert config.lora.target_modules == ["q", "v"]
    assert config.data.max_train_samples == 10


def test_none_word_unsets_optional_numbers():
    config = load_config(None, ["generation.batch_tokens=none", "data.max_source_length=None"])
    assert config.generation.batch_tokens is None
    assert config.data.max_source_length is None
    assert load_config(None, ["generation.batch_tokens=512"]).generation.batch_tokens == 512
    # Where "none" is a valid text value, it stays text.
    assert load_config(None, ["model.quantization=none"]).model.quantization == "none"
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=none"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.epochs")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_dump_round_trips():
    config = build_config({"lora": {"r": 4}, "train": {"epochs": 2}})
    assert build_config(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize("name", ["flan-t5-base-samsum.yaml", "flan-t5-xxl-samsum-int8.yaml", "smollm2-samsum.yaml"])
def test_shipped_recipes_load(name):
    config = load_config(CONFIGS / name)
    assert config.lora.r == 16


def test_flan_t5_recipe_matches_reference_setup():
    config = load_config(CONFIGS / "flan-t5-base-samsum.yaml")
    assert config.lora.alpha == 32
    assert config.lora.dropout == 0.05
    assert config.lora.target_modules == ["q", "v"]
    assert config.train.learning_rate == 1e-3
    assert config.train.epochs == 5


def test_quickstart_recipe_matches_file():
    from_file = load_config(CONFIGS / "smollm2-samsum.yaml")
    from_code = build_config(QUICKSTART_RECIPE)
    for section in ("model", "lora", "generation", "eval"):
        assert getattr(from_file, section) == getattr(from_code, section), section
    assert from_file.data.max_train_samples == from_code.data.max_train_samples
    assert from_file.train.learning_rate == from_code.train.learning_rate
