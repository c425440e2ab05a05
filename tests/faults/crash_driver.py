"""Run the loratune CLI in this process with one fault injected at a training step.

Usage: python crash_driver.py FAULT STEP CLI-ARGS...

The faults are real: SIGKILL and SIGINT are sent to this process with os.kill.

    kill-after-step       SIGKILL at the end of optimizer step STEP
    kill-after-save       SIGKILL right after checkpoint-STEP is complete
    kill-mid-save         SIGKILL while checkpoint-STEP's optimizer.pt is half written
    kill-in-eval          SIGKILL inside the validation-loss evaluation at step STEP
    kill-in-adapter-save  SIGKILL while the final adapter/ is half written (STEP is ignored)
    kill-in-final-eval    SIGKILL while the post-training ROUGE evaluation generates (STEP is ignored)
    sigint                one SIGINT at the end of step STEP
    double-sigint         two SIGINTs at the end of step STEP
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TrainerCallback

import loratune.evaluate.runner
from loratune.cli.main import main
from loratune.train.trainer import LoraTrainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultCallback(TrainerCallback):
    def __init__(self, fault: str, step: int):
        self.fault = fault
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        if self.fault == "kill-after-step":
            die()
        if self.fault in ("sigint", "double-sigint"):
            os.kill(os.getpid(), signal.SIGINT)
        if self.fault == "double-sigint":
            os.kill(os.getpid(), signal.SIGINT)

    def on_save(self, args, state, control, **kwargs):
        if self.fault == "kill-after-save" and state.global_step == self.step:
            die()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.fault == "kill-in-eval" and state.global_step == self.step:
            die()


def install(fault: str, step: int) -> None:
    original_init = LoraTrainer.__init__

    def init_with_fault(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(FaultCallback(fault, step))

    LoraTrainer.__init__ = init_with_fault

    if fault == "kill-mid-save":
        real_save = torch.save

        def half_save(obj, target, *args, **kwargs):
            target_name = str(target)
            if target_name.endswith("optimizer.pt") and f"checkpoint-{step}" in target_name:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                Path(target_name).write_bytes(data[: len(data) // 2])
                die()
            return real_save(obj, target, *args, **kwargs)

        torch.save = half_save

    if fault == "kill-in-adapter-save":
        real_save_pretrained = PeftModel.save_pretrained

        def half_save_pretrained(self, save_directory, *args, **kwargs):
            real_save_pretrained(self, save_directory, *args, **kwargs)
            weights = Path(save_directory) / "adapter_model.safetensors"
            if Path(save_directory).name == "adapter.tmp" and weights.is_file():
                data = weights.read_bytes()
                weights.write_bytes(data[: len(data) // 2])
                die()

        PeftModel.save_pretrained = half_save_pretrained

    if fault == "kill-in-final-eval":

        def generate_and_die(*args, **kwargs):
            die()

        loratune.evaluate.runner.generate = generate_and_die


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
