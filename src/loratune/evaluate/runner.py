"""Score a model on a split: generate, compute ROUGE, write predictions and metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from loratune.config import GenerationSettings
from loratune.data.formatting import encode_prompt
from loratune.data.loading import Example
from loratune.evaluate.generation import generate
from loratune.evaluate.rouge import per_example_scores
from loratune.models.inference import InferenceModel
from loratune.runs import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def evaluate_examples(
    loaded: InferenceModel,
    examples: Sequence[Example],
    settings: GenerationSettings,
    out_dir: Path,
    split: str,
    data_source: str,
) -> dict:
    """Generate summaries for ``examples``, score them, and write both files to ``out_dir``.

    Returns the metrics dict that is also written to ``metrics.json``.
    """
    prompts, truncated = [], 0
    for example in examples:
        ids, cut = encode_prompt(loaded.tokenizer, loaded.prompt, example.text, loaded.max_source_length)
        prompts.append(ids)
        truncated += cut
    if truncated:
        logger.warning("%d of %d inputs were cut to %s tokens", truncated, len(examples), loaded.max_source_length)

    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"generate {split}", unit="ex") as bar:
        outputs = generate(loaded.model, loaded.tokenizer, prompts, loaded.family, settings, bar.update)
    seconds = time.perf_counter() - start

    predictions = [item.text for item in outputs]
    scores = per_example_scores(predictions, [ex.references for ex in examples])
    lines = []
    for example, output, score in zip(examples, outputs, scores):
        record = {
            "id": example.id,
            "input": example.text,
            "references": example.references,
            "prediction": output.text,
            "new_tokens": output.new_tokens,
            "rouge": {key: round(value, 4) for key, value in score.items()},
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / PREDICTIONS_FILE, "\n".join(lines) + "\n")

    means = {key: round(sum(s[key] for s in scores) / len(scores), 4) for key in scores[0]}
    new_tokens = sum(item.new_tokens for item in outputs)
    metrics = {
        **means,
        "model": loaded.base_model,
        "adapter": loaded.adapter,
        "data": data_source,
        "split": split,
        "num_examples": len(examples),
        "inputs_truncated": truncated,
        "max_source_length": loaded.max_source_length,
        "prompt": loaded.prompt.to_dict(),
        "decoding": settings.model_dump(),
        "generation_seconds": round(seconds, 2),
        "examples_per_second": round(len(examples) / seconds, 3),
        "generated_tokens_per_second": round(new_tokens / seconds, 2),
    }
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    logger.info(
        "%s on %s (%d examples): ROUGE-1 %.2f ROUGE-2 %.2f ROUGE-L %.2f ROUGE-Lsum %.2f",
        loaded.adapter or loaded.base_model, split, len(examples),
        means["rouge1"], means["rouge2"], means["rougeL"], means["rougeLsum"],
    )
    return metrics


def format_comparison(rows: dict[str, dict]) -> str:
    """Format ROUGE results of several models as a text table (name -> metrics)."""
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    width = max(len(name) for name in rows) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{key:>11}" for key in keys) + f"{'examples':>10}"]
    for name, metrics in rows.items():
        values = "".join(f"{metrics[key]:>11.2f}" for key in keys)
        lines.append(f"{name:<{width}}{values}{metrics['num_examples']:>10}")
    return "\n".join(lines)
