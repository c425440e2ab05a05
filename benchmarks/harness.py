"""Shared pieces of the benchmark scripts: data, the tiny T5, child processes, timing, tables.

Every measured side runs in a child process of its own, one after another, so each one's
peak resident memory is its own and no two sides compete for the CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SAMSUM_ENV = "LORATUNE_SAMSUM_DIR"
SAMSUM_DEFAULT = Path("/work/shared/data/samsum")
IGNORE_INDEX = -100


def samsum_source() -> str:
    """Return the SAMSum folder ($LORATUNE_SAMSUM_DIR, else the shared copy), or 'demo'."""
    for candidate in (os.environ.get(SAMSUM_ENV), SAMSUM_DEFAULT):
        if candidate and (Path(candidate) / "train.jsonl").is_file():
            return str(candidate)
    print("SAMSum not found; falling back to the demo data set that ships with loratune", file=sys.stderr)
    return "demo"


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads in this process (None keeps torch's default, one per core).

    On a CPU shared with other jobs, one thread can be much faster: an OpenMP parallel region
    ends only when every thread has run, and a thread the OS has paused stalls it. Measured
    on the 2-core benchmark machine at load average 5: a 20-token SmolLM2 generate took 31 s
    with 2 threads and 3.4 s with 1.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_process_arguments(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    """Add the options every benchmark script takes: --threads, --json and the hidden --child."""
    parser.add_argument("--threads", type=int, help="torch threads in every process (default: torch's, one per core unless OMP_NUM_THREADS is set)")
    if json_output:
        parser.add_argument("--json", type=Path, help="also write all measurements to this file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)


def quiet_library_warnings() -> None:
    """Hide the warning that peft 0.21 triggers on every model load, as the loratune CLI does."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def read_child_spec(path: Path) -> dict:
    """Load the spec a child process runs from and apply its thread count."""
    quiet_library_warnings()
    spec = json.loads(Path(path).read_text())
    set_threads(spec.get("threads"))
    return spec


def start_parent(threads: int | None) -> str:
    """Apply the thread count, print the machine and data lines, and return the SAMSum source."""
    quiet_library_warnings()
    set_threads(threads)
    source = samsum_source()
    print(f"Machine: {machine_description()}")
    print(f"Data: {source}")
    return source


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_description() -> str:
    """CPU model, core count, torch threads, load average and library versions, on one line."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} thread{'' if threads == 1 else 's'}, "
        f"transformers {transformers.__version__}, load average {load}"
    )


def matmul_gflops(dtype_name: str, m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 2.0) -> float:
    """Best rate of ``(m x k) @ (k x n)`` in GFLOP/s over repeated runs lasting about ``seconds``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection and first-touch allocation
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


# Matmul shapes timed for the peak: a large square, and SmolLM2-135M's MLP and attention
# projections for 8 rows of about 230 tokens. The model shapes often run faster than the square.
PEAK_SHAPES = [(2048, 2048, 2048), (1840, 576, 1536), (1840, 1536, 576), (1840, 576, 576)]


def peak_matmul_gflops(dtype_name: str) -> float:
    """Return the best matmul rate in GFLOP/s over ``PEAK_SHAPES``, the peak that MFU divides by."""
    return max(matmul_gflops(dtype_name, m, k, n) for m, k, n in PEAK_SHAPES)


def run_child(script: Path, spec: dict, label: str) -> dict:
    """Run ``script --child SPEC`` in a fresh interpreter and return the JSON it writes."""
    with tempfile.TemporaryDirectory(prefix="loratune-bench-") as folder:
        spec = dict(spec, result_path=str(Path(folder) / "result.json"), work_dir=folder)
        threads = spec.get("threads")
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        print(f"  running {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        process = subprocess.run(
            [sys.executable, str(script), "--child", str(spec_path)],
            env=env, capture_output=True, text=True, cwd=REPO,
        )
        if process.returncode != 0:
            sys.stderr.write(process.stdout[-4000:] + process.stderr[-8000:])
            raise RuntimeError(f"benchmark child {label} failed with exit code {process.returncode}")
        result = json.loads(Path(spec["result_path"]).read_text())
        print(f"  {label} finished in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return result


def write_result(spec: dict, result: dict) -> None:
    Path(spec["result_path"]).write_text(json.dumps(result))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a Markdown table, so the printed output can be pasted into the docs."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


# Random T5 models built in code, since no pretrained T5 can be downloaded offline.
# "t5-tiny" is small enough to train in seconds. "t5-small" copies FLAN-T5-small's layer
# shapes (gated-GELU feed-forward, 32,128-way output layer), so its matmuls are those of a
# real checkpoint; the tokenizer still has 8,000 tokens. Both keep the original T5's scaling
# of the decoder output. FLAN-T5 turns it off, which with random weights started the loss at
# 140 to 170 (measured) instead of near ln(vocabulary size).
T5_SHAPES = {
    "t5-tiny": dict(d_model=256, d_ff=1024, d_kv=32, num_heads=8, num_layers=4, num_decoder_layers=4),
    "t5-small": dict(
        d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8,
        feed_forward_proj="gated-gelu", vocab_size=32128,
    ),
}


def build_t5(shape: str, folder: Path, texts: Sequence[str], vocab_size: int = 8000, seed: int = 0) -> Path:
    """Write a random T5 of ``T5_SHAPES[shape]`` and a BPE tokenizer trained on ``texts`` to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    special = ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    torch.manual_seed(seed)
    config = T5Config(**{
        "vocab_size": len(tokenizer),
        **T5_SHAPES[shape],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    })
    transformers_logging.disable_progress_bar()
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def t5_for_benchmark(shape: str, source: str, folder: Path) -> str:
    """Build the ``shape`` T5 in ``folder``, its tokenizer trained on 2,000 training rows of ``source``."""
    rows = load_rows(source, "train", 2000)
    texts = [row["text"] for row in rows] + [row["references"][0] for row in rows]
    return str(build_t5(shape, Path(folder) / shape, texts))


def load_rows(source: str, split: str, limit: int) -> list[dict]:
    """Read up to ``limit`` cleaned rows of a split as loratune reads them."""
    from loratune.config import DataConfig
    from loratune.data.loading import load_split

    examples, _ = load_split(DataConfig(source=source), split, limit)
    return [{"id": ex.id, "text": ex.text, "references": ex.references} for ex in examples]
