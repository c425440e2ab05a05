"""The LoRA fine-tuning recipe: config -> model + adapter -> data -> fit -> save -> evaluate."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

import loratune
from loratune.config import ConfigError, RunConfig, dump_config
from loratune.data.formatting import PromptFormat
from loratune.models.loading import LoadedModel, check_adapter_matches_base, load_model, read_model_config
from loratune.models.lora import attach_lora, keep_lora_branch_fp32
from loratune.runs import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DATA_STATS_FILE,
    INFO_FILE,
    LOG_DIR,
    TRAIN_LOG_FILE,
    RunInfo,
    run_lock,
    save_run_info,
    use_plain_file_modes,
    write_json_atomic,
    write_text_atomic,
)
from loratune.train.callbacks import EpochSeedCallback, InterruptCallback, TrainingInterrupted
from loratune.train.checkpoints import (
    check_resume_config,
    checkpoint_step,
    find_resume_checkpoint,
    load_adapter_weights,
    training_finished,
    trim_train_log,
)
from loratune.train.data import PreparedData, model_max_length, prepare_training_data
from loratune.train.memory import use_low_memory_allocator
from loratune.train.packing import PackingCollator
from loratune.train.trainer import LoraTrainer, MetricsLogCallback, PadCollator

logger = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    """Raised when the output folder contains another run and overwriting is off."""


@dataclass
class Precision:
    """Training precision: the dtype weights load in and the autocast mode Trainer uses."""

    load_dtype: torch.dtype
    bf16: bool
    fp16: bool

    @property
    def name(self) -> str:
        if self.bf16:
            return "bf16"
        return "fp16" if self.fp16 else "fp32"


def cpu_has_fast_bf16() -> bool:
    """Return True when this CPU has AVX512_BF16 or AMX instructions."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in checks if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_precision(config: RunConfig, model_type: str | None = None) -> Precision:
    """Choose the training precision; reject fp16 for T5-family models and without CUDA."""
    requested = config.train.precision
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            # bf16 autocast pays off only on CPUs with bf16 matrix instructions: on an AMD EPYC
            # with AVX512_BF16, a SmolLM2-135M LoRA step ran 1.5x faster than fp32.
            requested = "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16":
        if model_type in {"t5", "mt5", "umt5"}:
            raise ConfigError(
                "train.precision=fp16: T5-family models overflow in fp16 (their activations exceed "
                "65504) and train to NaN. Use bf16 on GPUs that support it, or fp32."
            )
        if not cuda:
            raise ConfigError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    quantized = config.model.quantization != "none"
    compute_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    compute = compute_dtypes[requested]
    # Trainable LoRA weights stay in fp32; autocast runs the matmuls in bf16/fp16.
    load_dtype = compute if quantized else torch.float32
    return Precision(load_dtype, requested == "bf16", requested == "fp16")


def check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise ``OutputDirError`` when the folder contains another run, unless resuming or overwriting.

    A non-empty folder that is not a loratune run is never deleted, even with overwriting on.
    """
    used = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not used:
            raise OutputDirError(f"--resume: {run_dir} is missing or empty, so there is no run to resume; drop --resume")
        if not (run_dir / CHECKPOINT_DIR).is_dir():
            raise OutputDirError(f"--resume: {run_dir} has no {CHECKPOINT_DIR}/ folder to resume from")
        return
    if not used:
        return
    if not any((run_dir / name).exists() for name in (CONFIG_FILE, INFO_FILE, CHECKPOINT_DIR)):
        raise OutputDirError(
            f"{run_dir} contains files that are not from a loratune run, and loratune never deletes "
            "such a folder, even with train.overwrite_output_dir=true. Choose an empty or new train.output_dir."
        )
    pre_training_files = {CONFIG_FILE, DATA_STATS_FILE, LOG_DIR, TRAIN_LOG_FILE}
    if {entry.name for entry in run_dir.iterdir()} <= pre_training_files:
        # Only files written before the first step are there, so the earlier run failed before
        # training started (bad data or model, say) and nothing in it is worth keeping.
        logger.warning("Reusing %s: the run there stopped before training started", run_dir)
        shutil.rmtree(run_dir)
        return
    if overwrite:
        logger.warning("Overwriting the run in %s", run_dir)
        shutil.rmtree(run_dir)
        return
    raise OutputDirError(
        f"{run_dir} already contains files from another run. Pass --resume to continue it, "
        "set train.overwrite_output_dir=true to replace it, or choose another train.output_dir."
    )


def training_arguments(config: RunConfig, run_dir: Path, precision: Precision, has_validation: bool) -> TrainingArguments:
    train = config.train
    eval_steps = train.eval_steps if has_validation else None
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        bf16=precision.bf16,
        use_cpu=not torch.cuda.is_available(),
        fp16=precision.fp16,
        activation_checkpointing=train.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        length_column_name="length",
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=train.dataloader_num_workers,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
    )


def build_trainer(
    config: RunConfig,
    run_dir: Path,
    loaded: LoadedModel,
    data: PreparedData,
    precision: Precision,
    resume_step: int | None = None,
) -> LoraTrainer:
    args = training_arguments(config, run_dir, precision, data.validation is not None)
    pad_id = loaded.tokenizer.pad_token_id
    callbacks = [MetricsLogCallback(run_dir / TRAIN_LOG_FILE), EpochSeedCallback(config.train.seed)]
    if "tensorboard" in config.train.report_to:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events an interrupted run logged after the checkpoint resumed from.
        purge_step = resume_step + 1 if resume_step is not None else None
        writer = SummaryWriter(log_dir=str(run_dir / LOG_DIR), purge_step=purge_step)
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    return LoraTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=PackingCollator(pad_id) if config.train.packing else PadCollator(pad_id),
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
        family=loaded.family,
    )


def train(config: RunConfig, resume: bool = False) -> Path:
    """Fine-tune with LoRA as ``config`` describes; return the run folder.

    The main process holds a lock on the run folder, so a second run into it fails at once.
    Under a distributed launcher every process calls this, and only rank 0 takes the lock.
    """
    run_dir = Path(config.train.output_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(config, run_dir, resume)
    with run_lock(run_dir):
        return _train(config, run_dir, resume)


def _train(config: RunConfig, run_dir: Path, resume: bool) -> Path:
    check_output_dir(run_dir, resume, config.train.overwrite_output_dir)
    checkpoint, changed = prepare_resume(run_dir, config) if resume else (None, [])
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)
    if config.train.low_memory_allocator:
        applied = use_low_memory_allocator()
        logger.info("Low-memory allocator: %s", "on" if applied else "not available with this C library")

    # The resolved config is saved first, so even a failed run records what it tried. It is
    # logged once model and data have loaded, so that their errors are not buried under it.
    write_text_atomic(run_dir / CONFIG_FILE, dump_config(config))

    # Model and tokenizer. The precision check needs the model type, read before the weights.
    _, hf_config = read_model_config(config.model)
    precision = resolve_precision(config, hf_config.model_type)
    loaded = load_model(config.model, dtype=precision.load_dtype)
    if config.train.packing and loaded.family != "causal":
        raise ConfigError(
            f"train.packing=true: {config.model.name_or_path} is a {loaded.family} model and "
            "packing is for causal models only; set train.packing=false"
        )
    logger.info("Training precision: %s", precision.name)
    fmt = PromptFormat.for_tokenizer(loaded.family, config.data.prompt, loaded.tokenizer)

    # Data: clean, measure lengths, pick max lengths, tokenize.
    model_max = model_max_length(loaded.tokenizer, loaded.model.config)
    data = prepare_training_data(config.data, loaded.tokenizer, fmt, model_max, config.train.eval_steps is not None)
    write_json_atomic(run_dir / DATA_STATS_FILE, data.stats)

    # Adapter: every base weight is frozen, only the LoRA matrices train.
    attach_adapter(loaded, config, checkpoint)
    if config.train.fp32_lora_branch and (precision.bf16 or precision.fp16):
        count = keep_lora_branch_fp32(loaded.model)
        logger.info("LoRA branch of %d layers computed in fp32 under %s autocast", count, precision.name)
    info = RunInfo(
        base_model=config.model.name_or_path,
        family=loaded.family,
        prompt=fmt.to_dict(),
        max_source_length=data.max_source_length,
        max_target_length=data.max_target_length,
        quantization=config.model.quantization,
        gguf_file=config.model.gguf_file,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        loratune_version=loratune.__version__,
    )

    logger.info("Resolved config:\n%s", dump_config(config))

    # Fit, then save the adapter and tokenizer where later commands look for them.
    resume_step = checkpoint_step(checkpoint) if checkpoint else None
    trainer = build_trainer(config, run_dir, loaded, data, precision, resume_step)
    interrupted = fit(trainer, checkpoint, changed)
    save_adapter(trainer, loaded, run_dir)
    save_run_info(run_dir, info)
    logger.info("Saved the adapter to %s", run_dir / ADAPTER_DIR)
    if interrupted:
        raise TrainingInterrupted(
            f"interrupted as training finished; the adapter is saved in {run_dir / ADAPTER_DIR}. "
            f"Score it with: loratune evaluate {run_dir}"
        )
    return run_dir


def attach_adapter(loaded: LoadedModel, config: RunConfig, checkpoint: Path | None) -> None:
    """Wrap ``loaded.model`` with a LoRA adapter that fits ``checkpoint`` when resuming."""
    try:
        loaded.model = attach_lora(
            loaded.model,
            config.lora,
            loaded.family,
            quantized=config.model.quantization != "none",
            gradient_checkpointing=config.train.gradient_checkpointing,
        )
    except ValueError as error:  # target modules that this model does not have
        raise ConfigError(str(error)) from None
    if checkpoint is not None:
        check_adapter_matches_base(checkpoint, loaded.model, config.model.name_or_path)


def prepare_resume(run_dir: Path, config: RunConfig) -> tuple[Path, list[str]]:
    """Pick the checkpoint to resume from and check the config against the run's own.

    Returns the checkpoint and the config keys that changed. The train log loses the records
    written after that checkpoint, so that it reads as one uninterrupted run.
    """
    checkpoint = find_resume_checkpoint(run_dir / CHECKPOINT_DIR)
    changed = check_resume_config(run_dir / CONFIG_FILE, config)
    removed = trim_train_log(run_dir / TRAIN_LOG_FILE, checkpoint_step(checkpoint))
    logger.info("Resuming from %s (%d records after it removed from %s)", checkpoint, removed, TRAIN_LOG_FILE)
    return checkpoint, changed


def fit(trainer: LoraTrainer, checkpoint: Path | None, changed: list[str]) -> bool:
    """Train, from ``checkpoint`` when given, and return True when Ctrl-C came as training ended.

    Raises ``TrainingInterrupted`` when Ctrl-C stopped training before its last step.
    """
    if checkpoint is not None and training_finished(checkpoint, changed):
        logger.info("%s is the final step; restoring its adapter without training", checkpoint)
        load_adapter_weights(trainer.model, checkpoint)
        return False
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    with interrupt.installed():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not interrupt.requested:
        return False
    if trainer.state.global_step < trainer.state.max_steps:
        saved = Path(trainer.args.output_dir) / f"checkpoint-{interrupt.stopped_at_step}"
        raise TrainingInterrupted(
            f"training interrupted at step {interrupt.stopped_at_step} of {trainer.state.max_steps}; "
            f"saved {saved}. Rerun the same command with --resume to continue."
        )
    return True


def save_adapter(trainer: LoraTrainer, loaded: LoadedModel, run_dir: Path) -> None:
    """Write the adapter and tokenizer to ``adapter/`` through a temporary folder.

    The old ``adapter/`` is renamed away before the new one takes its name, so ``adapter/``
    is never partly written; at worst a crash leaves ``adapter.old/`` next to it.
    """
    final = run_dir / ADAPTER_DIR
    tmp = run_dir / (ADAPTER_DIR + ".tmp")
    old = run_dir / (ADAPTER_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    use_plain_file_modes(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
