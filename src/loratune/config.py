"""Typed run configuration: YAML recipes, ``key=value`` overrides and validation.

A recipe is one YAML mapping with the sections ``model``, ``data``, ``lora``, ``train``,
``generation`` and ``eval``. Unknown keys, wrong types and out-of-range values are rejected
when the file is loaded, and every problem is reported in one ``ConfigError``.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """Raised when a recipe or an override is invalid. The message lists every problem."""


def _none_is_not_text(annotation: Any) -> bool:
    """Return True for an optional type with no text or literal member, such as ``int | None``."""
    members = typing.get_args(annotation)
    return (
        type(None) in members
        and str not in members
        and not any(typing.get_origin(member) is Literal for member in members)
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _none_word_is_none(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `none` as text, but on a command line it is the obvious way to unset a key.
        if isinstance(value, str) and value.strip().lower() == "none":
            field = cls.model_fields.get(info.field_name)
            if field is not None and _none_is_not_text(field.annotation):
                return None
        return value


class ModelConfig(_Section):
    """Base model to fine-tune."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        min_length=1,
        description="Hub model id, local folder, .gguf file, or 'embedded:smollm2-135m-instruct'.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path.")
    family: Literal["auto", "seq2seq", "causal"] = Field(
        "auto", description="Model family; 'auto' reads it from the model config."
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="Load the frozen base in 8-bit or 4-bit (bitsandbytes, CUDA only)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the model folder. Off by default."
    )


class DataConfig(_Section):
    """Dataset source, columns, cleaning and length limits."""

    source: str = Field(
        "knkarthick/samsum",
        min_length=1,
        description="Hub dataset id, a folder of split files, a single file, or 'demo'.",
    )
    train_split: str = Field("train", description="Split name used for training.")
    validation_split: str | None = Field(
        "validation", description="Split for the validation loss; None skips it."
    )
    test_split: str | None = Field("test", description="Split scored after training; None skips it.")
    text_column: str = Field("dialogue", description="Column with the input text.")
    summary_column: str = Field(
        "summary", description="Column with the target; a list column gives several references."
    )
    id_column: str | None = Field("id", description="Column with row ids; None numbers rows.")
    max_train_samples: int | None = Field(None, gt=0, description="Keep the first N train rows.")
    max_eval_samples: int | None = Field(
        None, gt=0, description="Keep the first N validation rows."
    )
    max_test_samples: int | None = Field(None, gt=0, description="Keep the first N test rows.")
    prompt: str = Field(
        "Summarize this dialogue:\n{text}",
        description="Input template; {text} is replaced by the input column.",
    )
    max_source_length: int | None = Field(
        None, gt=0, description="Max input tokens; None picks it from source_length_percentile."
    )
    max_target_length: int | None = Field(
        None, gt=0, description="Max target tokens; None picks it from target_length_percentile."
    )
    source_length_percentile: float = Field(
        95.0, gt=0, le=100, description="Percentile of train input lengths, in tokens, used as max_source_length."
    )
    target_length_percentile: float = Field(
        95.0, gt=0, le=100, description="Percentile of train target lengths, in tokens, used as max_target_length."
    )
    skip_bad_rows: bool = Field(
        False,
        description="Skip malformed JSON lines and rows whose columns have the wrong type, "
        "with a count, instead of stopping at the first one.",
    )


class LoraSettings(_Section):
    """LoRA adapter settings passed to ``peft.LoraConfig``."""

    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout probability on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which bias vectors train.")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description="Module names, 'all-linear', or 'auto' (q,v for T5; attention for Llama).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling: alpha/sqrt(r) instead of alpha/r.")


class TrainConfig(_Section):
    """Optimisation, precision, logging and checkpoint settings."""

    output_dir: str = Field("runs/loratune", description="Run folder for checkpoints, adapter, logs and metrics.")
    epochs: float = Field(1.0, gt=0, description="Passes over the train split; fractions allowed.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 trains for 'epochs'.")

    learning_rate: float = Field(3e-4, gt=0, description="Peak AdamW learning rate.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the LoRA weights.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (L2 norm).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on GPUs and CPUs with bf16 instructions, else fp32."
    )
    fp32_lora_branch: bool = Field(
        True,
        description="Under bf16/fp16 autocast, compute the LoRA branch and its sum with the "
        "frozen layer's output in fp32 (closer to the fp32 loss, a little slower).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower steps."
    )
    low_memory_allocator: bool = Field(
        False,
        description="Linux/glibc: return freed blocks over 4 MiB to the OS at once. Halves peak "
        "resident memory of SmolLM2 training with checkpointing (about 2.2 GiB), at about twice the step time.",
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length together.")
    packing: bool = Field(
        False,
        description="Causal models only: pack each micro-batch's examples into fewer rows.",
    )
    logging_steps: int = Field(10, gt=0, description="Optimizer steps between loss log records.")
    save_steps: int = Field(200, gt=0, description="Optimizer steps between checkpoints.")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept; None keeps all.")
    eval_steps: int | None = Field(None, gt=0, description="Validation loss every N steps.")
    seed: int = Field(42, description="Seed for weights init, batch order and dropout.")
    dataloader_num_workers: int = Field(0, ge=0, description="Data loader worker processes; 0 loads in the main process.")
    overwrite_output_dir: bool = Field(False, description="Allow training into a used folder.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trainer loggers; [] for none."
    )

    @field_validator("max_steps")
    @classmethod
    def _check_max_steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be a positive number of steps, or -1 to train for train.epochs")
        return value


class GenerationSettings(_Section):
    """Decoding settings used by evaluate, predict and serve."""

    max_new_tokens: int = Field(64, gt=0, description="Max generated tokens per summary.")
    num_beams: int = Field(1, gt=0, description="Beam width; 1 is greedy or sampling.")
    do_sample: bool = Field(False, description="Sample instead of greedy or beam search.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on repeated tokens; 1 is none.")
    batch_size: int = Field(16, gt=0, description="Max examples per generate() call.")
    batch_tokens: int | None = Field(
        None, gt=0,
        description="Max prompt tokens per generate() call, padding included; short prompts then "
        "share larger batches, up to batch_size (none: always batch_size).",
    )


class EvalConfig(_Section):
    """Evaluation run after training: the split, a row limit and the base-model comparison."""

    split: str = Field("test", description="Split scored by evaluate.")
    max_samples: int | None = Field(None, gt=0, description="Score the first N rows only.")
    run_after_training: bool = Field(True, description="Score the test split when training ends.")
    compare_base: bool = Field(False, description="Also score the base model without adapter.")


class RunConfig(_Section):
    """A complete recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        problems = []
        if "{text}" not in self.data.prompt:
            problems.append(f"data.prompt: must contain '{{text}}', got {self.data.prompt!r}")
        if self.generation.do_sample and self.generation.num_beams > 1:
            problems.append("generation: do_sample=true with num_beams>1 is not supported")
        if self.train.packing and self.model.family == "seq2seq":
            problems.append(
                "train.packing: packing is for causal models only; set it to false for seq2seq"
            )
        if self.model.quantization != "none" and self.train.precision == "fp32":
            problems.append("train.precision: fp32 with a quantized base; use 'auto' or 'bf16'")
        if self.train.eval_steps is not None and self.data.validation_split is None:
            problems.append(
                "train.eval_steps: set, but data.validation_split is null, so there is nothing to "
                "evaluate; set data.validation_split or remove train.eval_steps"
            )
        if isinstance(self.lora.target_modules, list) and not self.lora.target_modules:
            problems.append("lora.target_modules: the list is empty; name at least one module, or use 'auto'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _format_errors(error: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    """Describe every validation problem: on one line when there is one, else one per line."""
    origins = {".".join(parse_override(text)[0]): text for text in overrides or []}
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problem = f"{key}: unknown key (value {item['input']!r}); check the spelling"
        elif item["type"] == "value_error" and not item["loc"]:
            problem = item["msg"].removeprefix("Value error, ")  # cross-field checks name their keys
        else:
            message = item["msg"].removeprefix("Value error, ")
            problem = f"{key}: {message} (got {item['input']!r})"
        if key in origins:
            problem += f" (from the override {origins[key]})"
        problems.append(problem)
    if len(problems) == 1:
        return f"invalid configuration in {source}: {problems[0]}"
    lines = [f"invalid configuration in {source}, {len(problems)} problems:"]
    return "\n".join(lines + [f"  {problem}" for problem in problems])


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"invalid override {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b=value`` override set."""
    merged = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def build_config(data: dict, source: str = "configuration", overrides: list[str] | None = None) -> RunConfig:
    """Validate a mapping into a ``RunConfig``; raise ``ConfigError`` listing every problem.

    ``overrides`` are the ``key=value`` texts applied to ``data``; a problem with one of those
    keys names the override it came from.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration in {source}: expected a mapping of sections, got {type(data).__name__}"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source, overrides)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"invalid YAML in {path}: not valid UTF-8 text (byte {error.start})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML in {path}: {_describe_yaml_error(error)}") from None
        data = {} if data is None else data
    if overrides:
        data = apply_overrides(data, overrides) if isinstance(data, dict) else data
        if path is None:
            source = "overrides"
    return build_config(data, source, overrides)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """Return a one-line description of a YAML error with its line and column."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def dump_config(config: RunConfig) -> str:
    """Return the resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Return (key, type, default, description) for every recipe key, in schema order."""
    rows = []
    for section, section_field in RunConfig.model_fields.items():
        model = section_field.annotation
        for name, field in model.model_fields.items():
            annotation = str(field.annotation).replace("typing.", "").replace("Literal", "one of ")
            if isinstance(field.annotation, type):
                annotation = field.annotation.__name__
            default = field.default_factory() if field.default_factory else field.default
            limits = ", ".join(_describe_limit(item) for item in field.metadata)
            description = field.description or ""
            if limits:
                description = f"{description} ({limits})".strip()
            rows.append((f"{section}.{name}", annotation, repr(default), description))
    return rows


def _describe_limit(item) -> str:
    for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if hasattr(item, name):
            return f"{symbol} {getattr(item, name)}"
    if hasattr(item, "min_length"):
        return "not empty"
    return str(item)
