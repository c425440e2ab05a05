"""The ``loratune`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from loratune import __version__
from loratune.config import ConfigError, RunConfig, load_config
from loratune.data.loading import DataError

logger = logging.getLogger("loratune")

OVERRIDES_HELP = "config overrides as section.key=value, e.g. train.epochs=2 lora.r=8 ('loratune keys' lists them)"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratune",
        description="LoRA fine-tuning and ROUGE evaluation for seq2seq and causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"loratune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = commands.add_parser(
        "quickstart",
        help="fine-tune the embedded SmolLM2-135M on dialogue summaries and compare ROUGE",
        description="Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the CPU and print "
        "ROUGE before and after on the same test dialogues (about 13 minutes on 2 idle cores with SAMSum).",
    )
    quick.add_argument("--data", metavar="DIR", help="folder with train/validation/test files "
                       "(.jsonl, .json, .csv, .parquet); default: Hub knkarthick/samsum, else the demo set")
    quick.add_argument("--output", metavar="DIR", help="run folder (default: runs/quickstart)")
    quick.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    _add_common(quick)

    train = commands.add_parser("train", help="fine-tune with a YAML recipe",
                                description="Fine-tune with LoRA as CONFIG describes, then evaluate.")
    train.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. configs/flan-t5-base-samsum.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    _add_common(train)

    evaluate = commands.add_parser(
        "evaluate", help="score a run folder or a base model with ROUGE",
        description="Generate summaries for one split and score them with ROUGE-1/2/L/Lsum. TARGET is a "
        "run folder (base + adapter) or a base model (Hub id, folder, .gguf, or "
        "embedded:smollm2-135m-instruct) for a zero-shot baseline.",
    )
    evaluate.add_argument("target", metavar="TARGET", help="run folder or base model")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    evaluate.add_argument("--config", metavar="CONFIG", help="recipe for a base model (default: the run's config.yaml)")
    evaluate.add_argument("--data", metavar="SOURCE", help="data source: folder, file, Hub id or 'demo'")
    evaluate.add_argument("--split", help="split to score (default: eval.split, 'test')")
    evaluate.add_argument("--max-samples", type=int, metavar="N", help="score the first N rows only")
    evaluate.add_argument("--output", metavar="DIR", help="folder for predictions.jsonl and metrics.json")
    evaluate.add_argument("--with-base", action="store_true", help="also score the run's base model")
    _add_common(evaluate)

    prepare = commands.add_parser(
        "prepare", help="load and clean the data, print token length statistics",
        description="Load and clean the data of CONFIG, print row counts and token length statistics, "
        "and show the max lengths training would use. Trains nothing.",
    )
    prepare.add_argument("config", metavar="CONFIG", help="YAML recipe")
    prepare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    _add_common(prepare)

    from loratune.cli.ship import add_ship_commands

    keys = commands.add_parser(
        "keys", help="list every recipe key with its type, default and meaning",
        description="List every key a YAML recipe or a KEY=VALUE override can set.",
    )
    _add_common(keys)

    for name, handler in add_ship_commands(commands).items():
        COMMANDS[name] = handler
    return parser


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        # Progress bars written to a file or pipe update every 30 s instead of many times a
        # second. tqdm reads the variable when it is first imported.
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    # rouge-score logs "Using default tokenizer." through absl for every scorer it builds.
    logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.WARNING)
    # peft 0.21 reads a transformers attribute that transformers 5 deprecated; the warning
    # repeats on every model load and needs no action from the user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_info() if debug else transformers.logging.set_verbosity_error()
    else:  # read when transformers is first imported, which takes about a second
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if debug else "error"


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from loratune.evaluate.pipeline import evaluate_run
    from loratune.evaluate.runner import format_comparison
    from loratune.train.memory import release_memory
    from loratune.train.recipe import train

    run_dir = train(config, resume=args.resume)
    release_memory()
    if config.eval.run_after_training and not args.no_eval and config.data.test_split:
        results = evaluate_run(run_dir, config, config.eval.split, with_base=config.eval.compare_base)
        print(format_comparison(results))
    print(f"Run folder: {run_dir}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from loratune.cli.quickstart import describe_source, quickstart_config
    from loratune.evaluate.pipeline import evaluate_run
    from loratune.evaluate.runner import format_comparison
    from loratune.train.memory import release_memory
    from loratune.train.recipe import train

    config = quickstart_config(args.data, args.output, args.overrides)
    logger.info("Quickstart data: %s", describe_source(config.data.source))
    start = time.perf_counter()
    run_dir = train(config)
    train_seconds = time.perf_counter() - start
    release_memory()
    results = evaluate_run(run_dir, config, config.eval.split, with_base=True)
    total = time.perf_counter() - start
    print()
    print(f"ROUGE on {results['tuned']['num_examples']} '{config.eval.split}' examples of "
          f"{describe_source(config.data.source)} (F-measure x 100):")
    print(format_comparison({"base (zero-shot)": results["base"], "LoRA fine-tuned": results["tuned"]}))
    print(f"Training took {train_seconds / 60:.1f} min; everything took {total / 60:.1f} min.")
    print(f"Run folder: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from loratune.evaluate.pipeline import evaluate_base, evaluate_run, is_run, run_config
    from loratune.evaluate.runner import format_comparison

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.max_samples:
        overrides.append(f"eval.max_samples={args.max_samples}")
    if args.target.startswith(("/", ".", "~")) and not Path(args.target).expanduser().exists():
        raise FileNotFoundError(f"evaluate target not found: {args.target} (expected a run folder or a model)")
    if is_run(args.target):
        config = load_config(args.config, overrides) if args.config else run_config(Path(args.target), overrides)
        split = args.split or config.eval.split
        results = evaluate_run(Path(args.target), config, split, args.output, with_base=args.with_base)
    else:
        overrides.append(f"model.name_or_path={args.target}")
        config = load_config(args.config, overrides)
        split = args.split or config.eval.split
        out_dir = Path(args.output or "runs/eval-base")
        results = {"base": evaluate_base(config, split, out_dir)}
    print(format_comparison(results))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    config: RunConfig = load_config(args.config, args.overrides)
    from transformers import AutoConfig

    from loratune.data.formatting import PromptFormat
    from loratune.models.loading import load_tokenizer, resolve_model_path
    from loratune.train.data import model_max_length, prepare_training_data

    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path, config.model)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    family = config.model.family if config.model.family != "auto" else (
        "seq2seq" if hf_config.is_encoder_decoder else "causal")
    fmt = PromptFormat.for_tokenizer(family, config.data.prompt, tokenizer)
    data = prepare_training_data(config.data, tokenizer, fmt, model_max_length(tokenizer, hf_config), True)
    print(json.dumps(data.stats, indent=2))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from loratune.config import describe_keys

    section = None
    for key, annotation, default, description in describe_keys():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            print(f"\n{section}:")
        print(f"  {key}  [{annotation}, default {default}]")
        if description:
            print(f"      {description}")
    return 0


COMMANDS = {"keys": cmd_keys, "train": cmd_train, "quickstart": cmd_quickstart, "evaluate": cmd_evaluate, "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow the options; argparse leaves those in ``extra``.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    setup_logging(args.debug)

    # Expected failures print one line (the full traceback with --debug). Exit status: 2 for
    # invalid input, 1 for a failed run, 130 for Ctrl-C. The error classes of the torch-based
    # modules are imported only when an exception arrives, so a bad config fails fast.
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as error:
        return _report_error(args, f"error: {error}", 2)
    except _input_errors() as error:
        return _report_error(args, f"error: {error}", 2)
    except _run_errors() as error:
        return _report_error(args, f"error: {error}", 1)
    except BrokenPipeError:  # stdout piped into a command that stopped reading, e.g. head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # e.g. a full disk or a read-only output folder
        where = f": {error.filename}" if error.filename else ""
        return _report_error(args, f"error: {error.strerror or error}{where}", 1)
    except _interrupted_error() as error:
        return _report_error(args, str(error), 130)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"loratune {args.command}: interrupted", file=sys.stderr)
        return 130


def _input_errors() -> tuple[type[Exception], ...]:
    from loratune.models.loading import ModelLoadError
    from loratune.runs import RunLockedError
    from loratune.train.recipe import OutputDirError

    return ModelLoadError, OutputDirError, RunLockedError


def _run_errors() -> tuple[type[Exception], ...]:
    from loratune.train.callbacks import NonFiniteLossError
    from loratune.train.checkpoints import CheckpointError

    return CheckpointError, NonFiniteLossError


def _interrupted_error() -> type[Exception]:
    from loratune.train.callbacks import TrainingInterrupted

    return TrainingInterrupted


def _report_error(args: argparse.Namespace, message: str, status: int) -> int:
    if args.debug:
        raise
    _close_progress_bars()
    print(f"loratune {args.command}: {message}", file=sys.stderr)
    return status


def _close_progress_bars() -> None:
    """Close tqdm bars left open by an exception, so the message starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
