"""Request bodies of the HTTP server, its limits, and how requests become generation settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loratune.config import GenerationSettings


class RequestError(Exception):
    """A client error: the HTTP status and a message that names the fix."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits; requests beyond them get a 4xx response naming the limit."""

    max_body_bytes: int = 1 << 20
    max_texts: int = 32
    max_input_tokens: int = 4096
    max_new_tokens: int = 256
    max_num_beams: int = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SummarizeRequest(_Body):
    """``POST /v1/summarize``: one text or a list of texts, optional decoding settings."""

    text: str | list[str]
    max_new_tokens: int | None = Field(None, ge=1)
    num_beams: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)


class _OpenAIBody(_Body):
    """Fields shared by the OpenAI-compatible endpoints.

    Sampling is off unless ``temperature`` is above 0, so a request that leaves it out gets
    greedy decoding, as in ``loratune evaluate`` (OpenAI's own default is 1).
    Fields that loratune cannot honour are accepted only at their neutral value.
    """

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    seed: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_unsupported(self):
        problems = []
        if self.n not in (None, 1):
            problems.append(f"n: only 1 choice per prompt is supported, got {self.n}")
        if self.stream:
            problems.append("stream: streaming is not supported; send stream=false")
        if self.stop:
            problems.append("stop: stop sequences are not supported; generation ends at the end-of-sequence token")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                problems.append(f"{name}: not supported, got {getattr(self, name)}; use 0 or leave it out")
        if self.logit_bias:
            problems.append("logit_bias: not supported; leave it out")
        if self.logprobs not in (None, False, 0):
            problems.append("logprobs: not supported; leave it out")
        if self.seed is not None:
            problems.append("seed: not supported, because prompts of several requests share one batch")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CompletionRequest(_OpenAIBody):
    """``POST /v1/completions``: ``prompt`` is the text to summarize, or a list of texts."""

    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion_fields(self):
        if self.echo:
            raise ValueError("echo: not supported; leave it out")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of: only 1 is supported, got {self.best_of}")
        if self.suffix:
            raise ValueError("suffix: not supported; leave it out")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_OpenAIBody):
    """``POST /v1/chat/completions``: one user message holding the text to summarize."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def input_text(self) -> str:
        # The prompt format was fixed in training, so a system message or earlier turns would
        # be dropped without a trace; reject them instead.
        if len(self.messages) != 1 or self.messages[0].role != "user":
            roles = [message.role for message in self.messages]
            raise RequestError(
                422,
                f"messages: expected exactly one message with role 'user' holding the text to "
                f"summarize, got roles {roles}. This model's prompt format was fixed in training, "
                "so system messages and conversation history are not supported.",
            )
        return self.messages[0].text()


def format_validation_errors(errors: list[dict]) -> str:
    """Join pydantic errors into one message: ``field: problem (got value)``."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            parts.append(f"{location}: unknown field; check the spelling")
        elif error.get("type") == "missing":
            parts.append(f"{location}: missing")
        elif error.get("type") == "value_error":
            parts.append(message)
        else:
            got = repr(error.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            parts.append(f"{location}: {message} (got {got})")
    return "; ".join(parts)


def resolve_settings(defaults: GenerationSettings, limits: ServeLimits, **requested) -> GenerationSettings:
    """Apply the request's decoding fields (None means the server default) within ``limits``."""
    update = {key: value for key, value in requested.items() if value is not None}
    problems = []
    max_new_tokens = update.get("max_new_tokens", defaults.max_new_tokens)
    if max_new_tokens > limits.max_new_tokens:
        problems.append(f"max_new_tokens: {max_new_tokens} is above the server limit of {limits.max_new_tokens}")
    num_beams = update.get("num_beams", defaults.num_beams)
    if num_beams > limits.max_num_beams:
        problems.append(f"num_beams: {num_beams} is above the server limit of {limits.max_num_beams}")
    if update.get("do_sample", defaults.do_sample) and num_beams > 1:
        problems.append("do_sample=true with num_beams>1 is not supported; choose one")
    if problems:
        raise RequestError(422, "; ".join(problems))
    try:
        return GenerationSettings.model_validate({**defaults.model_dump(), **update})
    except ValidationError as error:
        raise RequestError(422, format_validation_errors(error.errors())) from None


def openai_settings(body: _OpenAIBody, max_tokens: int | None, defaults: GenerationSettings, limits: ServeLimits) -> GenerationSettings:
    """Map OpenAI sampling fields onto generation settings: temperature 0 or unset is greedy."""
    sampling = body.temperature is not None and body.temperature > 0
    return resolve_settings(
        defaults,
        limits,
        max_new_tokens=max_tokens,
        do_sample=sampling,
        num_beams=1 if sampling else None,
        temperature=body.temperature if sampling else None,
        top_p=body.top_p if sampling else None,
    )
