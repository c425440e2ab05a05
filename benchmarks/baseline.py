"""The reference LoRA recipe as it is commonly written, re-implemented as the benchmark baseline.

Training: every example is padded to the fixed max source and target lengths when it is
tokenized, and the model stays in fp32. A plain ``Trainer`` (``Seq2SeqTrainer`` for T5)
with its default data loading trains it with the model's own loss over full logits.
Evaluation: ``generate`` is called once per example.

Tokenization reuses loratune's prompt and target encoders, so both sides train on exactly
the same tokens and truncation; the baseline differs only in the points above. The PEFT
``LoraConfig`` is the one loratune builds from the same settings.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from peft import get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from loratune.config import RunConfig
from loratune.data.formatting import IGNORE_INDEX, PromptFormat, encode_prompt, encode_target
from loratune.data.loading import Example
from loratune.models.lora import build_lora_config


def padded_features(
    examples: list[Example], tokenizer, fmt: PromptFormat, max_source: int, max_target: int
) -> datasets.Dataset:
    """Tokenize with ``padding='max_length'`` semantics: every row has the same width."""
    pad_id = tokenizer.pad_token_id
    rows = []
    for example in examples:
        prompt, _ = encode_prompt(tokenizer, fmt, example.text, max_source)
        target, _ = encode_target(tokenizer, fmt, example.target, max_target)
        if fmt.family == "seq2seq":
            source_pad = max_source - len(prompt)
            rows.append(
                {
                    "input_ids": prompt + [pad_id] * source_pad,
                    "attention_mask": [1] * len(prompt) + [0] * source_pad,
                    "labels": target + [IGNORE_INDEX] * (max_target - len(target)),
                }
            )
        else:
            ids = prompt + target
            pad = max_source + max_target - len(ids)
            # The pad id may equal the EOS id (SmolLM2), so labels are masked by position, not by id.
            rows.append(
                {
                    "input_ids": ids + [pad_id] * pad,
                    "attention_mask": [1] * len(ids) + [0] * pad,
                    "labels": [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * pad,
                }
            )
    return datasets.Dataset.from_list(rows)


def reference_trainer(
    model, tokenizer, family: str, dataset: datasets.Dataset, config: RunConfig, out_dir: Path
) -> Trainer:
    """Attach LoRA and build the plain fp32 trainer of the reference recipe."""
    model = get_peft_model(model, build_lora_config(config.lora, model, family))
    train = config.train
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=train.seed,
    )
    if family == "seq2seq":
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
        args = Seq2SeqTrainingArguments(**common)
        return Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    args = TrainingArguments(**common)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)


@torch.inference_mode()
def generate_one_at_a_time(model, tokenizer, prompts: list[list[int]], family: str, max_new_tokens: int) -> list[dict]:
    """Greedy ``generate`` with batch size 1; return the text and new-token count of each prompt."""
    model.eval()
    results = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0]
        # Causal outputs repeat the prompt; seq2seq outputs start with the decoder start token.
        new = output[len(ids):] if family == "causal" else output[1:]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        results.append({"text": text, "new_tokens": int(new.numel())})
    return results
