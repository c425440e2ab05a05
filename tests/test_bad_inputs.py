"""Bad input through the real CLI: each case ends with one exact error line and no traceback.

Every case runs ``loratune train RECIPE OVERRIDES...`` in this process. Placeholders in the
arguments and messages: {tmp} (the test's folder), {recipe}, {llama} (a tiny Llama folder),
{t5} (a tiny T5 folder).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loratune.cli.main import main
from loratune.config import ConfigError, ModelConfig
from loratune.models.loading import load_model

SKIP_HINT = "set data.skip_bad_rows=true to skip such rows with a count"
GOOD_ROW = '{"id": "1", "dialogue": "A: hi B: hello", "summary": "They greet."}\n'
# A small valid run: the data and model cases fail before any training step.
RUN = ["train.output_dir={tmp}/run", "train.max_steps=1", "train.batch_size=2", "--no-eval"]
LLAMA_RUN = ["model.name_or_path={llama}", "data.source=demo", *RUN]


def data_run(name: str) -> list[str]:
    return ["model.name_or_path={llama}", f"data.source={{tmp}}/{name}", *RUN]


def copy_model(source: str, target: str, keep: tuple[str, ...]):
    """Return a setup step that copies only the files named in ``keep`` of a model folder."""

    def setup(tmp: Path, models: dict) -> None:
        (tmp / target).mkdir()
        for name in keep:
            shutil.copy(Path(models[source]) / name, tmp / target / name)

    return setup


def make_run_folder(*names: str):
    """Return a setup step that creates ``{tmp}/run`` containing the given files and folders."""

    def setup(tmp: Path, models: dict) -> None:
        for name in names:
            path = tmp / "run" / name
            if name.endswith("/"):
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")

    return setup


@dataclass
class Case:
    id: str
    args: list[str]
    message: str
    recipe: str = "{}\n"
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[Path, dict], None] | None = None
    status: int = 2


CASES = [
    # Config: unknown keys, wrong types, out-of-range values, missing values, contradictions.
    Case("unknown key", [], "invalid configuration in {recipe}: lora.rank: unknown key (value 8); check the spelling",
         recipe="lora:\n  rank: 8\n"),
    Case("unknown key in override", ["train.epoch=2"],
         "invalid configuration in {recipe}: train.epoch: unknown key (value 2); check the spelling "
         "(from the override train.epoch=2)"),
    Case("unknown section", [], "invalid configuration in {recipe}: trainer: unknown key (value {{'epochs': 1}}); "
         "check the spelling", recipe="trainer:\n  epochs: 1\n"),
    Case("wrong type", [], "invalid configuration in {recipe}: lora.r: Input should be a valid integer, unable to "
         "parse string as an integer (got 'eight')", recipe="lora:\n  r: eight\n"),
    Case("rank zero", ["lora.r=0"], "invalid configuration in {recipe}: lora.r: Input should be greater than 0 "
         "(got 0) (from the override lora.r=0)"),
    Case("dropout one", ["lora.dropout=1.0"], "invalid configuration in {recipe}: lora.dropout: Input should be "
         "less than 1 (got 1.0) (from the override lora.dropout=1.0)"),
    Case("dropout negative", ["lora.dropout=-0.1"], "invalid configuration in {recipe}: lora.dropout: Input should "
         "be greater than or equal to 0 (got -0.1) (from the override lora.dropout=-0.1)"),
    Case("negative learning rate", [], "invalid configuration in {recipe}: train.learning_rate: Input should be "
         "greater than 0 (got -0.0001)", recipe="train:\n  learning_rate: -1.0e-4\n"),
    Case("zero max steps", ["train.max_steps=0"], "invalid configuration in {recipe}: train.max_steps: must be a "
         "positive number of steps, or -1 to train for train.epochs (got 0) (from the override train.max_steps=0)"),
    Case("empty model name", [], "invalid configuration in {recipe}: model.name_or_path: String should have at "
         "least 1 character (got '')", recipe="model:\n  name_or_path: ''\n"),
    Case("missing section body", [], "invalid configuration in {recipe}: model: Input should be a valid "
         "dictionary or instance of ModelConfig (got None)", recipe="model:\n"),
    Case("empty target list", ["lora.target_modules=[]"], "invalid configuration in {recipe}: lora.target_modules: "
         "the list is empty; name at least one module, or use 'auto'"),
    Case("sampling with beams", ["generation.do_sample=true", "generation.num_beams=4"],
         "invalid configuration in {recipe}: generation: do_sample=true with num_beams>1 is not supported"),
    Case("eval steps without validation", ["train.eval_steps=5", "data.validation_split=null"],
         "invalid configuration in {recipe}: train.eval_steps: set, but data.validation_split is null, so there is "
         "nothing to evaluate; set data.validation_split or remove train.eval_steps"),
    Case("fp32 with quantized base", ["model.quantization=int8", "train.precision=fp32"],
         "invalid configuration in {recipe}: train.precision: fp32 with a quantized base; use 'auto' or 'bf16'"),
    Case("fp16 on t5", ["model.name_or_path={t5}", "train.precision=fp16", *RUN],
         "train.precision=fp16: T5-family models overflow in fp16 (their activations exceed 65504) and train to "
         "NaN. Use bf16 on GPUs that support it, or fp32."),
    Case("target module not in model", ["lora.target_modules=[query]", *LLAMA_RUN],
         "lora.target_modules: ['query'] not found among the model's linear layers ['down_proj', 'gate_proj', "
         "'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    Case("override without value", ["lora.r"], "invalid override 'lora.r': expected section.key=value"),
    Case("invalid yaml", [], "invalid YAML in {recipe}: line 2, column 1: expected ',' or ']', but got "
         "'<stream end>'", recipe="train: [unclosed\n"),
    Case("yaml not a mapping", [], "invalid configuration in {recipe}: expected a mapping of sections, got list",
         recipe="- lora\n"),
    Case("yaml not utf-8", [], "invalid YAML in {recipe}: not valid UTF-8 text (byte 10)",
         recipe="# comment \udce9\n"),
    # Data: files, encodings, JSON lines, columns, types, empty results.
    Case("data file missing", data_run("missing.jsonl"), "data file not found: {tmp}/missing.jsonl"),
    Case("split missing from folder", ["model.name_or_path={llama}", "data.source={tmp}/data", *RUN],
         "{tmp}/data: split 'train' not found; available splits: ['test']", files={"data/test.jsonl": GOOD_ROW}),
    Case("unsupported file type", data_run("rows.txt"),
         "{tmp}/rows.txt: unsupported file type; use one of .jsonl, .json, .csv, .parquet", files={"rows.txt": "x"}),
    Case("jsonl not utf-8", data_run("rows.jsonl"),
         f"{{tmp}}/rows.jsonl: line 2: not valid UTF-8 text (byte 28 of the line); {SKIP_HINT}",
         files={"rows.jsonl": GOOD_ROW.encode() + b'{"id": "2", "dialogue": "caf\xe9", "summary": "b"}\n'}),
    Case("csv not utf-8", data_run("rows.csv"), "{tmp}/rows.csv: not valid UTF-8 text (byte 25)",
         files={"rows.csv": b"id,dialogue,summary\n1,caf\xe9,b\n"}),
    Case("malformed json line", data_run("rows.jsonl"),
         f"{{tmp}}/rows.jsonl: line 3: invalid JSON (Expecting ',' delimiter, column 12); {SKIP_HINT}",
         files={"rows.jsonl": GOOD_ROW * 2 + '{"id": "3" "dialogue": "x"}\n'}),
    Case("json line not an object", data_run("rows.jsonl"),
         f"{{tmp}}/rows.jsonl: line 2: expected a JSON object, got list; {SKIP_HINT}",
         files={"rows.jsonl": GOOD_ROW + '["a", "b"]\n'}),
    Case("missing column", data_run("rows.jsonl"), "{tmp}/rows.jsonl: column(s) ['summary'] not found; available "
         "columns: ['dialogue', 'id', 'text']. Set data.text_column and data.summary_column.",
         files={"rows.jsonl": '{"id": "1", "dialogue": "a", "text": "b"}\n'}),
    Case("summary not text", data_run("rows.jsonl"), "{tmp}/rows.jsonl: row 2: column 'summary' must be text or "
         f"a list of texts, got int; {SKIP_HINT}",
         files={"rows.jsonl": GOOD_ROW + '{"id": "2", "dialogue": "a", "summary": 5}\n'}),
    Case("dialogue not text", data_run("rows.jsonl"), "{tmp}/rows.jsonl: row 1: column 'dialogue' must be text, "
         f"got dict; {SKIP_HINT}", files={"rows.jsonl": '{"id": "1", "dialogue": {"a": 1}, "summary": "b"}\n'}),
    Case("nothing left after cleaning", data_run("rows.jsonl"), "{tmp}/rows.jsonl: split 'train' has no usable rows "
         "after cleaning (train: 0 of 2 rows kept from {tmp}/rows.jsonl (dropped: 1 empty input, 1 empty summary))",
         files={"rows.jsonl": '{"dialogue": " ", "summary": "s"}\n{"dialogue": "d", "summary": "\\r\\n"}\n'}),
    Case("empty file", data_run("rows.jsonl"), "{tmp}/rows.jsonl: split 'train' has no usable rows after cleaning "
         "(train: 0 of 0 rows kept from {tmp}/rows.jsonl)", files={"rows.jsonl": ""}),
    Case("hub dataset offline", ["model.name_or_path={llama}", "data.source=nobody/no-such-data", *RUN],
         "data source 'nobody/no-such-data' is not a local file or folder, and the Hub dataset could not be loaded "
         "(ConnectionError). Point data.source at a local file or a folder of train/validation/test files "
         "(--data DIR for quickstart and evaluate)."),
    # Model: unknown id without network, folders that are not models, custom code.
    Case("hub model offline", ["model.name_or_path=nobody/no-such-model", "data.source=demo", *RUN],
         "model 'nobody/no-such-model' is not a local folder and the Hugging Face Hub could not be reached. "
         "Download it on a connected machine and set model.name_or_path to that folder. (OSError: We couldn't "
         "connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.)"),
    Case("model folder missing", ["model.name_or_path=./no-such-folder", "data.source=demo", *RUN],
         "model folder not found: ./no-such-folder"),
    Case("folder without config", ["model.name_or_path={tmp}/notes", "data.source=demo", *RUN],
         "{tmp}/notes is not a model folder: it has no config.json. Point model.name_or_path at a folder written "
         "by save_pretrained, a .gguf file, or a Hub id.", files={"notes/readme.txt": "x"}),
    Case("folder without weights", ["model.name_or_path={tmp}/half", "data.source=demo", *RUN],
         "{tmp}/half has a config.json but no weights (model.safetensors or pytorch_model.bin); copy the complete "
         "folder written by save_pretrained", setup=copy_model("llama", "half", ("config.json", "tokenizer.json"))),
    Case("folder without tokenizer", ["model.name_or_path={tmp}/bare", "data.source=demo", *RUN],
         "failed to load the tokenizer from '{tmp}/bare': ValueError: Couldn't instantiate the backend tokenizer "
         "from one of:", setup=copy_model("llama", "bare", ("config.json", "model.safetensors"))),
    Case("unknown embedded model", ["model.name_or_path=embedded:gpt", "data.source=demo", *RUN],
         "unknown embedded model 'embedded:gpt'; the only one is 'embedded:smollm2-135m-instruct'"),
    Case("gguf file missing", ["model.name_or_path={tmp}/model.gguf", "data.source=demo", *RUN],
         "GGUF file not found: {tmp}/model.gguf"),
    # Output folder collisions and --resume without a run.
    Case("folder contains another run", LLAMA_RUN, "{tmp}/run already contains files from another run. Pass --resume "
         "to continue it, set train.overwrite_output_dir=true to replace it, or choose another train.output_dir.",
         setup=make_run_folder("loratune.json")),
    Case("overwrite a folder that is no run", [*LLAMA_RUN, "train.overwrite_output_dir=true"],
         "{tmp}/run contains files that are not from a loratune run, and loratune never deletes such a folder, "
         "even with train.overwrite_output_dir=true. Choose an empty or new train.output_dir.",
         setup=make_run_folder("thesis.tex")),
    Case("resume without a run", [*LLAMA_RUN, "--resume"],
         "--resume: {tmp}/run is missing or empty, so there is no run to resume; drop --resume"),
    Case("resume without checkpoints folder", [*LLAMA_RUN, "--resume"],
         "--resume: {tmp}/run has no checkpoints/ folder to resume from", setup=make_run_folder("config.yaml")),
    Case("resume without checkpoint", [*LLAMA_RUN, "--resume"],
         "--resume: {tmp}/run/checkpoints contains no checkpoint-<step> folder; the run stopped before its first "
         "checkpoint. Start it again without --resume, with train.overwrite_output_dir=true.",
         setup=make_run_folder("config.yaml", "checkpoints/"), status=1),
]


@pytest.fixture
def models(tiny_llama_dir, tiny_t5_dir) -> dict:
    return {"llama": str(tiny_llama_dir), "t5": str(tiny_t5_dir)}


def prepare_case(case: Case, tmp_path: Path, models: dict) -> tuple[list[str], dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(case.recipe.encode("utf-8", "surrogateescape"))
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        case.setup(tmp_path, models)
    values = {"tmp": str(tmp_path), "recipe": str(recipe), **models}
    return ["train", str(recipe), *[arg.format(**values) for arg in case.args]], values


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_line(case, tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, values = prepare_case(case, tmp_path, models)
    status = main(argv)
    error = capsys.readouterr().err
    expected = f"loratune train: error: {case.message.format(**values)}"

    assert status == case.status
    assert "Traceback" not in error
    last_line = error.splitlines()[-1]
    if case.id == "folder without tokenizer":  # the rest of the line is transformers' wording
        assert last_line.startswith(expected)
    else:
        assert last_line == expected


def test_debug_shows_the_exception(tmp_path, models):
    argv, _ = prepare_case(CASES[0], tmp_path, models)
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key"):
        main([*argv, "--debug"])


def test_several_config_problems_reported_together(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora:\n  r: 0\n  alhpa: 3\n")
    assert main(["train", str(recipe), "train.epochs=many"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-4:] == [
        f"loratune train: error: invalid configuration in {recipe}, 3 problems:",
        "  lora.r: Input should be greater than 0 (got 0)",
        "  lora.alhpa: unknown key (value 3); check the spelling",
        "  train.epochs: Input should be a valid number, unable to parse string as a number (got 'many') "
        "(from the override train.epochs=many)",
    ]


def test_custom_model_code_needs_trust_remote_code(tmp_path, tiny_llama_dir, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "loratune_custom"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")

    status = main(["train", str(recipe), f"model.name_or_path={folder}", "data.source=demo",
                   f"train.output_dir={tmp_path / 'run'}", "--no-eval"])
    assert status == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: model '{folder}' ships Python code (auto_map in its config.json), which loratune "
        "does not run by default. Read that code, and set model.trust_remote_code=true only if you trust it."
    )
    assert not marker.exists()


def test_pickle_weights_warn_before_loading(tmp_path, tiny_llama_dir, caplog):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(ModelConfig(name_or_path=str(folder)))
    assert loaded.family == "causal"
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(message.startswith(f"{folder} has only pickle weights (pytorch_model.bin)") for message in warnings)


def test_tokenizer_without_pad_token_trains(tmp_path, tiny_llama_plain_dir, caplog):
    caplog.set_level(logging.INFO, logger="loratune")
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_llama_plain_dir, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tokenizer_config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")

    status = main(["train", str(recipe), f"model.name_or_path={folder}", "data.source=demo",
                   f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2", "--no-eval"])
    assert status == 0
    assert "Tokenizer has no pad token; using '</s>'" in caplog.text


def test_long_rows_are_cut_and_counted(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    status = main(["prepare", str(recipe), f"model.name_or_path={tiny_llama_dir}", "data.source=demo",
                   "data.max_source_length=16", "data.max_target_length=8"])
    assert status == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train_truncation"] == {"inputs_truncated": 60, "targets_truncated": 60}
    assert stats["max_source_length"] == 16


def test_skip_bad_rows_counts_them(tmp_path, tiny_llama_dir, capsys, caplog):
    rows = tmp_path / "train.jsonl"
    rows.write_bytes(
        GOOD_ROW.encode() * 3
        + b'{"id": "x" "dialogue": 1}\n'  # line 4: invalid JSON
        + b'["not", "an", "object"]\n'  # line 5
        + b'{"id": "y", "dialogue": "caf\xe9", "summary": "s"}\n'  # line 6: not UTF-8
        + b'{"id": "z", "dialogue": "d", "summary": 7}\n'  # wrong column type
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    status = main(["prepare", str(recipe), f"model.name_or_path={tiny_llama_dir}", f"data.source={rows}",
                   "data.skip_bad_rows=true"])
    assert status == 0
    train = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert train["rows_read"] == 7
    assert train["rows_kept"] == 3
    assert train["dropped"] == {"wrong column type": 1, "malformed JSON line": 3}
    assert f"{rows}: skipped 3 malformed lines (line 4, 5, 6)" in caplog.text


def test_resume_rejects_other_model_settings(tmp_path, tiny_llama_dir, tiny_t5_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    base = ["train", str(recipe), "data.source=demo", f"train.output_dir={run_dir}", "train.max_steps=2",
            "train.batch_size=2", "train.save_steps=1", "--no-eval"]
    assert main([*base, f"model.name_or_path={tiny_llama_dir}"]) == 0
    capsys.readouterr()

    assert main([*base, f"model.name_or_path={tiny_t5_dir}", "lora.r=4", "--resume"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: --resume: the run in {run_dir} was started with other model or LoRA settings "
        f"(lora.r: 16 -> 4; model.name_or_path: '{tiny_llama_dir}' -> '{tiny_t5_dir}'). Resume with the settings "
        f"in {run_dir / 'config.yaml'}, or start a new run in another train.output_dir."
    )


def wider_llama(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """Save a copy of the tiny Llama with hidden size 64 instead of 32."""
    wider = tmp_path / "wider"
    shutil.copytree(tiny_llama_dir, wider)
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size = 64
    LlamaForCausalLM(config).save_pretrained(wider)
    return wider


def test_resume_rejects_adapter_of_other_shape(tmp_path, tiny_llama_dir, capsys):
    """Without the run's config.yaml, the adapter's shapes still catch a different base model."""
    wider = wider_llama(tmp_path, tiny_llama_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    base = ["train", str(recipe), "data.source=demo", f"train.output_dir={run_dir}", "train.max_steps=2",
            "train.batch_size=2", "train.save_steps=1", "--no-eval"]
    assert main([*base, f"model.name_or_path={tiny_llama_dir}"]) == 0
    (run_dir / "config.yaml").unlink()
    capsys.readouterr()

    assert main([*base, f"model.name_or_path={wider}", "--resume"]) == 2
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune train: error: the adapter in {checkpoint} does not fit the base model '{wider}': layer "
        "model.layers.0.self_attn.k_proj has in_features=64, the adapter expects 32. It was trained on "
        f"'{tiny_llama_dir}'; use that base model."
    )


def test_evaluate_rejects_adapter_of_other_base(tmp_path, tiny_llama_dir, capsys):
    """A run whose recorded base model changed since training fails before generating."""
    wider = wider_llama(tmp_path, tiny_llama_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    args = ["train", str(recipe), f"model.name_or_path={tiny_llama_dir}", "data.source=demo",
            f"train.output_dir={run_dir}", "train.max_steps=1", "train.batch_size=2", "--no-eval"]
    assert main(args) == 0
    info = json.loads((run_dir / "loratune.json").read_text())
    info["base_model"] = str(wider)
    (run_dir / "loratune.json").write_text(json.dumps(info))
    capsys.readouterr()

    assert main(["evaluate", str(run_dir), "--data", "demo", "--max-samples", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loratune evaluate: error: the adapter in {run_dir / 'adapter'} does not fit the base model "
        f"'{wider}': layer model.layers.0.self_attn.k_proj has in_features=64, the adapter expects 32. "
        f"It was trained on '{tiny_llama_dir}'; use that base model."
    )


def test_pickled_adapter_is_warned_about(tmp_path, caplog):
    from loratune.models.loading import warn_if_pickled_adapter

    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        warn_if_pickled_adapter(tmp_path)
    assert f"{tmp_path} has only pickle weights (adapter_model.bin)" in caplog.text
    caplog.clear()
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        warn_if_pickled_adapter(tmp_path)
    assert caplog.text == ""
