"""Subcommands that ship a trained run: merge, predict and serve."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("loratune")

TARGET_HELP = (
    "run folder (base + adapter), folder written by 'loratune merge', or base model "
    "(Hub id, folder, .gguf, or embedded:smollm2-135m-instruct)"
)
OVERRIDES_HELP = "config overrides as section.key=value, e.g. generation.num_beams=4"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fail(args: argparse.Namespace, error: Exception) -> int:
    if args.debug:
        raise error
    print(f"loratune {args.command}: error: {error}", file=sys.stderr)
    return 2


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR_OR_MODEL", help=TARGET_HELP)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument("--config", metavar="CONFIG",
                        help="recipe for prompt and decoding settings (default: the run's config.yaml)")


def cmd_merge(args: argparse.Namespace) -> int:
    from loratune.export.merge import MergeError, merge_run

    try:
        out_dir = merge_run(Path(args.run_dir), Path(args.out), overwrite=args.overwrite)
    except MergeError as error:
        return _fail(args, error)
    if out_dir is None:
        print(f"{args.run_dir} is already a merged model; nothing to do, and nothing was written to "
              f"{args.out}. Use {args.run_dir} as it is, or copy it.")
        return 0
    print(f"Merged model: {out_dir}")
    return 0


def _generation_settings(config, args: argparse.Namespace):
    update = {}
    if args.batch_size is not None:
        update["batch_size"] = args.batch_size
    if args.max_new_tokens is not None:
        update["max_new_tokens"] = args.max_new_tokens
    return config.generation.model_validate({**config.generation.model_dump(), **update})


def cmd_predict(args: argparse.Namespace) -> int:
    from loratune.export.predict import PredictOutputError, predict_file
    from loratune.export.target import load_target, target_config

    config = target_config(args.target, args.config, args.overrides)
    settings = _generation_settings(config, args)
    text_column = args.text_column or config.data.text_column
    id_column = args.id_column or config.data.id_column
    try:
        loaded = load_target(args.target, config)
        report = predict_file(
            loaded, Path(args.input), Path(args.output), settings,
            text_column=text_column, id_column=id_column, id_column_required=args.id_column is not None,
            resume=args.resume, overwrite=args.overwrite,
        )
    except PredictOutputError as error:
        return _fail(args, error)
    rate = report.generated / report.seconds if report.seconds else 0.0
    noun = "prediction" if report.rows == 1 else "predictions"
    print(f"Wrote {report.rows} {noun} to {report.output} ({report.resumed} from the partial file, "
          f"{report.generated} generated in {report.seconds:.1f} s, {rate:.2f} rows/s).")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from loratune.config import ConfigError
    from loratune.export.target import describe_target, load_target, target_config
    from loratune.serve.app import create_app
    from loratune.serve.schemas import ServeLimits
    from loratune.serve.server import read_api_key, run_server
    from loratune.serve.service import ServeOptions

    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must not be negative, got {args.batch_wait_ms}")
    config = target_config(args.target, args.config, args.overrides)
    api_key = read_api_key(args.api_key_file)
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes,
        max_texts=args.max_texts,
        max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens_limit,
        max_num_beams=args.max_num_beams,
    )
    if config.generation.max_new_tokens > limits.max_new_tokens:
        raise ConfigError(
            f"generation.max_new_tokens={config.generation.max_new_tokens} is above "
            f"--max-new-tokens-limit {limits.max_new_tokens}; raise the limit or lower the setting"
        )
    loaded = load_target(args.target, config)
    target_path = Path(args.target)
    name = args.model_name or (target_path.resolve().name if target_path.is_dir() else args.target)
    options = ServeOptions(
        model_name=name, api_key=api_key, limits=limits, defaults=config.generation,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
    )
    description = describe_target(args.target, loaded)
    logger.info("Model: %s", description)
    run_server(create_app(loaded, options, description), args.host, args.port, args.shutdown_timeout, api_key is not None)
    return 0


def _add_merge(commands) -> None:
    merge = commands.add_parser(
        "merge", help="merge a run's adapter into its base and save a standalone model",
        description="Merge the LoRA adapter of RUN_DIR into a float32 copy of its base model and save "
        "a standalone transformers model (safetensors, tokenizer, generation config). A base trained "
        "in 8-bit or 4-bit is merged unquantized. A folder that is already merged is left as it is.",
    )
    merge.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'loratune train'")
    merge.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    _add_common(merge)


def _add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict", help="summarize every row of a JSONL, CSV or Parquet file",
        description="Summarize every row of FILE with batched generation and write one JSON line per "
        "row (id, prediction, token counts) in input order. Finished batches go to OUTPUT.partial "
        "first, so an interrupted run leaves whole lines there; --resume continues it.",
    )
    _add_target_options(predict)
    predict.add_argument("--input", required=True, metavar="FILE", help=".jsonl, .json, .csv or .parquet file")
    predict.add_argument("--output", required=True, metavar="FILE", help=".jsonl file for the predictions")
    predict.add_argument("--text-column", metavar="NAME", help="column to summarize (default: data.text_column)")
    predict.add_argument("--id-column", metavar="NAME",
                         help="column with unique row ids (default: data.id_column; rows are numbered if it is missing)")
    predict.add_argument("--batch-size", type=_positive_int, metavar="N", help="max rows per generate() call (default: generation.batch_size)")
    predict.add_argument("--max-new-tokens", type=_positive_int, metavar="N", help="max tokens per summary (default: generation.max_new_tokens)")
    predict.add_argument("--resume", action="store_true", help="continue from OUTPUT.partial")
    predict.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_common(predict)


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve a run or model over HTTP (summarize and OpenAI-compatible routes)",
        description="Serve RUN_DIR_OR_MODEL over HTTP with dynamic batching. The API key, if any, is read "
        "from --api-key-file or the LORATUNE_API_KEY environment variable.",
    )
    _add_target_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--model-name", metavar="NAME", help="model id in responses (default: the folder name)")
    serve.add_argument("--api-key-file", metavar="FILE", help="file whose first line is the API key")
    serve.add_argument("--max-batch-size", type=_positive_int, default=8, metavar="N",
                       help="max prompts per generate() call; 1 turns dynamic batching off (default: 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                       help="how long a prompt waits for others to fill its batch (default: 10)")
    serve.add_argument("--max-queue", type=_positive_int, default=1024, metavar="N",
                       help="max prompts waiting; beyond it requests get 503 (default: 1024)")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, metavar="BYTES",
                       help="max request body size (default: 1048576)")
    serve.add_argument("--max-texts", type=_positive_int, default=32, metavar="N", help="max texts per request (default: 32)")
    serve.add_argument("--max-input-tokens", type=_positive_int, default=4096, metavar="N",
                       help="max tokens per input text; longer texts get 422, and texts over the run's "
                       "max source length are cut as in evaluation (default: 4096)")
    serve.add_argument("--max-new-tokens-limit", type=_positive_int, default=256, metavar="N",
                       help="max new tokens a request may ask for (default: 256)")
    serve.add_argument("--max-num-beams", type=_positive_int, default=4, metavar="N", help="max beams a request may ask for (default: 4)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGINT/SIGTERM, how long to wait for requests in flight (default: 30)")
    _add_common(serve)


def add_ship_commands(commands: argparse._SubParsersAction) -> dict:
    """Register the ship subcommands on ``commands``; return {name: handler}."""
    _add_merge(commands)
    _add_predict(commands)
    _add_serve(commands)
    return {"merge": cmd_merge, "predict": cmd_predict, "serve": cmd_serve}
