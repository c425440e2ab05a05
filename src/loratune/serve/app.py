"""The HTTP server: FastAPI routes over one model, with dynamic batching.

Routes:

- ``POST /v1/summarize``: ``{"text": "..."}`` or ``{"text": ["...", "..."]}`` with optional
  decoding settings; returns the summaries with token counts and timing.
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI-compatible. The prompt
  (or the single user message) is the text to summarize, and the server wraps it in the run's
  prompt format, exactly as ``/v1/summarize`` and ``loratune evaluate`` do. Chat completions
  exist only for causal models whose tokenizer has a chat template.
- ``GET /health`` (never needs the API key) and ``GET /v1/models``.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import loratune
from loratune.models.inference import InferenceModel
from loratune.serve.guard import RequestGuard
from loratune.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SummarizeRequest,
    format_validation_errors,
    openai_settings,
    resolve_settings,
)
from loratune.serve.service import ServeOptions, SummarizerService, Summary

logger = logging.getLogger("loratune.serve")


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def _error_response(request: Request, status: int, message: str, kind: str) -> JSONResponse:
    logger.info("%s rejected with %d: %s", _request_id(request), status, message)
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _usage(summaries: list[Summary]) -> dict:
    prompt = sum(item.prompt_tokens for item in summaries)
    completion = sum(item.new_tokens for item in summaries)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_model(requested: str | None, options: ServeOptions) -> None:
    if requested is not None and requested != options.model_name:
        raise RequestError(
            404, f"model {requested!r} not found; this server serves {options.model_name!r}", "not_found_error"
        )


def add_exception_handlers(app: FastAPI) -> None:
    """Return every error as an OpenAI-style JSON body: ``{"error": {"message": ...}}``."""

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError):
        return _error_response(request, error.status, error.message, error.kind)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        errors = list(error.errors())
        broken = [item for item in errors if item.get("type") == "json_invalid"]
        if broken:
            detail = "; ".join(str(item.get("ctx", {}).get("error", "")) for item in broken)
            return _error_response(request, 400, f"invalid JSON body: {detail}", "invalid_request_error")
        return _error_response(request, 422, format_validation_errors(errors), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        return _error_response(request, error.status_code, str(error.detail), "invalid_request_error")


def add_info_routes(app: FastAPI, service: SummarizerService, description: dict) -> None:
    options = service.options
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        batcher = service.batcher
        return {
            "status": "ok",
            "model": options.model_name,
            "queued_prompts": batcher.queued if batcher else 0,
            "batches_run": batcher.batches_run if batcher else 0,
            "prompts_run": batcher.prompts_run if batcher else 0,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": options.model_name, "object": "model", "created": created, "owned_by": "loratune"}
        limits = {key: getattr(options.limits, key) for key in options.limits.__dataclass_fields__}
        chat = service.loaded.prompt.use_chat_template
        return {"object": "list", "data": [{**card, **description, "limits": limits, "chat": chat}]}


def add_summarize_route(app: FastAPI, service: SummarizerService) -> None:
    options = service.options

    @app.post("/v1/summarize")
    async def summarize(body: SummarizeRequest, request: Request) -> dict:
        started = time.perf_counter()
        texts = [body.text] if isinstance(body.text, str) else body.text
        decoding = body.model_dump(exclude={"text"})
        settings = resolve_settings(options.defaults, options.limits, **decoding)
        summaries = await service.summarize(texts, settings)
        items = [
            {
                "summary": item.text,
                "prompt_tokens": item.prompt_tokens,
                "new_tokens": item.new_tokens,
                "input_truncated": item.input_truncated,
                "finish_reason": item.finish_reason,
            }
            for item in summaries
        ]
        timing = {
            "total_ms": round(1000 * (time.perf_counter() - started), 1),
            "queue_ms": round(1000 * max(item.queue_seconds for item in summaries), 1),
        }
        return {"id": _request_id(request), "model": options.model_name, "summaries": items,
                "usage": _usage(summaries), "timing": timing}


def add_openai_routes(app: FastAPI, service: SummarizerService) -> None:
    options = service.options
    chat_available = service.loaded.prompt.use_chat_template

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict:
        _check_model(body.model, options)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        settings = openai_settings(body, body.max_tokens, options.defaults, options.limits)
        summaries = await service.summarize(texts, settings)
        choices = [
            {"index": index, "text": item.text, "finish_reason": item.finish_reason, "logprobs": None}
            for index, item in enumerate(summaries)
        ]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": options.model_name, "choices": choices, "usage": _usage(summaries)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict:
        _check_model(body.model, options)
        if not chat_available:
            raise RequestError(
                404, f"{options.model_name!r} has no chat template, so chat completions are not "
                "available; use POST /v1/completions", "not_found_error",
            )
        settings = openai_settings(body, body.max_completion_tokens or body.max_tokens, options.defaults, options.limits)
        (item,) = await service.summarize([body.input_text()], settings)
        choice = {"index": 0, "message": {"role": "assistant", "content": item.text}, "finish_reason": item.finish_reason}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": options.model_name, "choices": [choice], "usage": _usage([item])}


def create_app(loaded: InferenceModel, options: ServeOptions, description: dict | None = None) -> FastAPI:
    """Build the server app for ``loaded``; the batcher starts and stops with the app's lifespan."""
    service = SummarizerService(loaded, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start_batcher()
        logger.info(
            "Serving %r: max batch size %d, batch wait %.1f ms, API key %s",
            options.model_name, options.max_batch_size, options.batch_wait_ms,
            "required" if options.api_key else "not required",
        )
        yield
        # uvicorn runs this after in-flight requests finished (or the shutdown timeout passed).
        await service.stop_batcher()
        logger.info("Stopped serving %r", options.model_name)

    app = FastAPI(title="loratune", version=loratune.__version__, lifespan=lifespan)
    app.state.service = service
    add_exception_handlers(app)
    add_info_routes(app, service, description or {})
    add_summarize_route(app, service)
    add_openai_routes(app, service)
    app.add_middleware(RequestGuard, api_key=options.api_key, max_body_bytes=options.limits.max_body_bytes)
    return app
