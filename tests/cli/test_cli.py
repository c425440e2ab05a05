import json
import os
import subprocess
import sys

import pytest

from loratune.cli.main import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    output = capsys.readouterr().out
    for command in ("quickstart", "train", "evaluate", "prepare"):
        assert command in output


@pytest.mark.parametrize("command", ["quickstart", "train", "evaluate", "prepare"])
def test_subcommand_help_explains_options(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    output = capsys.readouterr().out
    assert "KEY=VALUE" in output
    assert "--debug" in output


def test_config_error_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora:\n  rank: 8\n")
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "lora.rank: unknown key" in error
    assert "Traceback" not in error


def test_train_then_evaluate(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    overrides = [f"model.name_or_path={tiny_llama_dir}", "data.source=demo", f"train.output_dir={run_dir}",
                 "train.max_steps=2", "train.batch_size=4", "eval.max_samples=3", "generation.max_new_tokens=4",
                 "lora.r=2"]
    assert main(["train", str(recipe), *overrides]) == 0
    assert (run_dir / "eval" / "test" / "metrics.json").is_file()

    out_dir = tmp_path / "again"
    assert main(["evaluate", str(run_dir), "--split", "validation", "--max-samples", "2", "--output", str(out_dir)]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["split"] == "validation"
    assert metrics["num_examples"] == 2
    assert metrics["adapter"].endswith("adapter")
    assert "tuned" in capsys.readouterr().out


def test_evaluate_base_model(tiny_t5_dir, tmp_path):
    out_dir = tmp_path / "base"
    args = ["evaluate", str(tiny_t5_dir), "--data", "demo", "--max-samples", "2", "--output", str(out_dir),
            "generation.max_new_tokens=4"]
    assert main(args) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["adapter"] is None
    assert metrics["num_examples"] == 2


def test_prepare_prints_length_stats(tiny_t5_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_t5_dir}\ndata:\n  source: demo\n  source_length_percentile: 50\n")
    assert main(["prepare", str(recipe)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["rows_kept"] == 60
    assert stats["max_source_length"] == stats["train_lengths"]["input"]["p50"]


def test_parser_rejects_unknown_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])


def test_keys_lists_every_recipe_key(capsys):
    from loratune.config import RunConfig

    assert main(["keys"]) == 0
    output = capsys.readouterr().out
    for section, section_field in RunConfig.model_fields.items():
        for name in section_field.annotation.model_fields:
            assert f"  {section}.{name}  [" in output
    assert "  train.learning_rate  [float, default 0.0003]\n      Peak AdamW learning rate. (> 0)\n" in output
    assert "  lora.dropout  [float, default 0.05]\n      Dropout probability on the LoRA input. (>= 0, < 1)\n" in output


def test_progress_bars_slow_down_without_terminal():
    # A child process whose stderr is a pipe, so that tqdm is first imported after setup_logging.
    code = ("import io; from loratune.cli.main import setup_logging; setup_logging(False); "
            "from tqdm import tqdm; print(tqdm(total=1, file=io.StringIO()).mininterval)")
    env = {key: value for key, value in os.environ.items() if key != "TQDM_MININTERVAL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "30.0"
