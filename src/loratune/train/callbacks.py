"""Training safeguards: Ctrl-C handling, a non-finite loss check, and epoch-seeded data order."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised when Ctrl-C stopped training after a checkpoint was saved."""


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite."""


class InterruptCallback(TrainerCallback):
    """Turn the first Ctrl-C (SIGINT) into "save a checkpoint and stop"; a second one exits at once.

    The first signal only sets a flag, so the current optimizer step finishes, a checkpoint is
    written at its end, and training stops. A second signal raises ``KeyboardInterrupt`` right
    away, without saving.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at_step: int | None = None
        self._previous = None

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT for the duration of the block; a no-op outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        # None means the handler was not set from Python; the default then applies again.
        self._previous = previous if previous is not None else signal.SIG_DFL
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "Interrupted: saving a checkpoint at the end of this step, then stopping. "
            "Press Ctrl-C again to exit at once without saving."
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and self.stopped_at_step is None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control


def _train_sampler(dataloader):
    """Return the index sampler under accelerate's dataloader and batch-sampler wrappers."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    while hasattr(batch_sampler, "batch_sampler"):
        batch_sampler = batch_sampler.batch_sampler
    return getattr(batch_sampler, "sampler", None)


class EpochSeedCallback(TrainerCallback):
    """Draw each epoch's length-grouped batch order from (seed, epoch) instead of the global RNG.

    transformers' ``LengthGroupedSampler`` and its subclasses shuffle with the global torch RNG
    when an epoch starts. A resumed process reaches that point with another RNG state than an
    uninterrupted run, so a run resumed after its first epoch saw its batches in a different
    order and ended with different weights. Giving the sampler its own generator, seeded from
    the training seed and the epoch index, makes the order depend on those two numbers only.
    Random sampling needs no fix: accelerate already seeds it per epoch.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = _train_sampler(train_dataloader)
        if not isinstance(sampler, LengthGroupedSampler):
            return control
        batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(-(-batches // accumulation), 1)
        epoch = state.global_step // steps_per_epoch
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        sampler.generator = torch.Generator().manual_seed(seed)
        return control


def nonfinite_loss_causes(args: TrainingArguments, model_type: str | None) -> list[str]:
    """List the likely reasons for a NaN or infinite loss under these settings, likeliest first."""
    causes = []
    if args.fp16:
        note = " (T5-family models are known to)" if model_type in {"t5", "mt5", "umt5"} else ""
        causes.append(f"fp16 overflow: activations above 65504 overflow{note}; use train.precision=bf16 or fp32")
    elif args.bf16:
        causes.append("bf16 rounding in mixed precision; try train.precision=fp32")
    causes.append(f"a learning rate too high for this model: train.learning_rate={args.learning_rate:g}; try it 10x lower")
    return causes


def check_finite_loss(loss: torch.Tensor, step: int, args: TrainingArguments, model_type: str | None) -> None:
    """Raise ``NonFiniteLossError`` naming the step and likely causes when ``loss`` is NaN or inf.

    Called on every micro-batch before the optimizer step, so the weights never take a NaN
    update. The check reads one value back from the device per micro-batch.
    """
    if bool(torch.isfinite(loss).all()):
        return
    value = loss.detach().float().item()
    causes = "; or ".join(nonfinite_loss_causes(args, model_type))
    raise NonFiniteLossError(
        f"the training loss is {value} at step {step}, so training stopped before that step's "
        f"update. Likely cause: {causes}. Fix it, then start again or continue from the last "
        "checkpoint with --resume."
    )
