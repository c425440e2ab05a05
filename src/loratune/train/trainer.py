"""Trainer pieces: dynamic padding, a memory-lean causal loss and a metrics log."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints

from loratune.data.formatting import IGNORE_INDEX
from loratune.runs import use_plain_file_modes
from loratune.train.callbacks import check_finite_loss
from loratune.train.checkpoints import (
    STAGING_DIR,
    CheckpointError,
    checkpoint_write_failure,
    publish_checkpoint,
    read_log_state,
    write_log_state,
)
from loratune.train.packing import ShuffledLengthGroupedSampler


class PadCollator:
    """Pad a list of features to the longest sequence in the batch.

    ``input_ids`` are padded with the tokenizer's pad id, ``labels`` with ``IGNORE_INDEX`` and
    ``attention_mask`` with 0. Padding goes on the right, which is what training expects.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, lengths: list[int]) -> int:
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        width = self._width([len(ids) for ids in inputs])
        label_width = self._width([len(ids) for ids in labels])
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * (width - len(ids)) for ids in inputs]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in inputs]),
            "labels": torch.tensor([ids + [IGNORE_INDEX] * (label_width - len(ids)) for ids in labels]),
        }
        return batch


class LoraTrainer(Trainer):
    """``Trainer`` whose causal-LM loss computes logits at response positions only.

    The stock causal loss materialises fp32 logits for every position: batch x sequence x
    vocabulary (8 x 256 x 49,152 floats is 400 MB for SmolLM2, several times over once the
    softmax and its gradient are counted). Here the model returns the final hidden states, and
    the output layer runs only on positions whose next token is a label.
    """

    def __init__(self, *args, family: str = "causal", **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self._staging_dir: str | None = None
        self._pending_log_state: dict | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            self._pending_log_state = read_log_state(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._pending_log_state is not None:
            # Trainer zeroes its loss accumulator when training starts. Putting back the sum
            # since the last log step makes the next logged loss average the same steps as an
            # uninterrupted run. NOTE: both attributes are Trainer internals (transformers 5.25).
            self._tr_loss.fill_(self._pending_log_state["loss_sum"])
            self._globalstep_last_logged = self._pending_log_state["last_logged_step"]
            self._pending_log_state = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        check_finite_loss(loss, self.state.global_step + 1, self.args, model_type)
        return loss

    def _get_output_dir(self, trial) -> str:
        # While _save_checkpoint runs, Trainer writes into the staging folder.
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, then rename it to ``checkpoint-<step>``.

        A crash or a full disk during the write leaves the previous checkpoints untouched.
        """
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING_DIR
        name = f"checkpoint-{self.state.global_step}"
        shutil.rmtree(staging, ignore_errors=True)
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            write_log_state(staging / name, self._tr_loss.item(), self._globalstep_last_logged)
            use_plain_file_modes(staging / name)
            publish_checkpoint(staging / name, run_dir / name)
            staging.rmdir()
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(checkpoint_write_failure(name, run_dir, error)) from error
        finally:
            self._staging_dir = None
        # Trainer rotated inside the staging folder only; rotate the real one by step number.
        rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            # transformers yields each group's batches longest first; shuffle the batch order.
            return ShuffledLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.family != "causal":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        if "position_ids" in inputs:
            # Packed rows (train/packing.py): with no attention_mask and no cache, transformers
            # builds the per-example block-diagonal causal mask from the restarting position ids.
            attention = {"position_ids": inputs["position_ids"]}
        else:
            attention = {"attention_mask": inputs["attention_mask"]}
        outputs = model(
            input_ids=inputs["input_ids"],
            **attention,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        hidden = outputs.hidden_states[-1][:, :-1]  # (B, T-1, H): the state that predicts token t+1
        targets = labels[:, 1:].to(hidden.device)  # (B, T-1)
        mask = targets != IGNORE_INDEX
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        logits = head(hidden[mask]).float()  # (N, V) with N = number of label tokens
        loss = F.cross_entropy(logits, targets[mask], reduction="sum")

        if num_items_in_batch is not None:
            # Normalised over the whole accumulated batch, so Trainer must not divide again.
            loss = loss / num_items_in_batch
            self.loss_is_scaled_for_ga = True
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / mask.sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False
        return (loss, outputs) if return_outputs else loss


class MetricsLogCallback(TrainerCallback):
    """Append every logged metric dict to a JSON Lines file, with the step and wall time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "elapsed_s": round(time.time() - self.start, 2)}
        record.update(logs)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
