"""Turn request texts into prompts, run them through the dynamic batcher, collect summaries.

Tokenizing happens on the event loop with a separate copy of the tokenizer, because a
Hugging Face fast tokenizer must not be used by two threads at once, and the model's own
tokenizer is busy in the worker thread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from loratune.config import GenerationSettings
from loratune.data.formatting import encode_prompt
from loratune.data.loading import clean_text
from loratune.evaluate.generation import Generated, generate
from loratune.models.inference import InferenceModel
from loratune.serve.batching import BatcherClosedError, BatchResult, DynamicBatcher, QueueFullError
from loratune.serve.schemas import RequestError, ServeLimits


@dataclass
class ServeOptions:
    """Server settings that do not depend on the model."""

    model_name: str
    api_key: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 1024


@dataclass
class Summary:
    """One generated summary with what the client needs to account for it."""

    text: str
    prompt_tokens: int
    new_tokens: int
    input_truncated: bool
    finish_reason: str
    queue_seconds: float


class SummarizerService:
    """Turn texts into prompts, queue them on the batcher, and collect the summaries."""

    def __init__(self, loaded: InferenceModel, options: ServeOptions):
        self.loaded = loaded
        self.options = options
        self.request_tokenizer = copy.deepcopy(loaded.tokenizer)
        self.batcher: DynamicBatcher | None = None

    def run_batch(self, prompts: list[list[int]], settings: GenerationSettings) -> list[Generated]:
        """Runs in the worker thread."""
        loaded = self.loaded
        return generate(loaded.model, loaded.tokenizer, prompts, loaded.family, settings)

    def encode(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        limits = self.options.limits
        if len(texts) > limits.max_texts:
            raise RequestError(
                422, f"{len(texts)} texts in one request; the server limit is {limits.max_texts} (--max-texts)"
            )
        if not texts:
            raise RequestError(422, "no texts given; send at least one")
        encoded = []
        for index, text in enumerate(texts):
            # Cleaned as training, evaluation and predict clean their inputs (\r\n to \n, no
            # surrounding whitespace), so the same text gets the same prompt everywhere.
            text = clean_text(text)
            if not text:
                raise RequestError(422, f"text {index} is empty")
            length = len(self.request_tokenizer(text, add_special_tokens=False)["input_ids"])
            if length > limits.max_input_tokens:
                raise RequestError(
                    422,
                    f"text {index} has {length} tokens; the server limit is {limits.max_input_tokens} "
                    "(--max-input-tokens). Shorten or split it.",
                )
            encoded.append(encode_prompt(self.request_tokenizer, self.loaded.prompt, text, self.loaded.max_source_length))
        return encoded

    async def summarize(self, texts: list[str], settings: GenerationSettings) -> list[Summary]:
        encoded = self.encode(texts)
        try:
            results: list[BatchResult] = await self.batcher.submit([ids for ids, _ in encoded], settings)
        except QueueFullError as error:
            raise RequestError(503, str(error), "server_busy") from None
        except BatcherClosedError as error:
            raise RequestError(503, str(error), "server_shutting_down") from None
        summaries = []
        for (_, cut), result in zip(encoded, results):
            output = result.generated
            # NOTE: a text whose end-of-sequence token was exactly the last allowed token is
            # reported as "length", because Generated does not record why generation stopped.
            finish = "length" if output.new_tokens >= settings.max_new_tokens else "stop"
            summaries.append(Summary(output.text, output.prompt_tokens, output.new_tokens, cut, finish, result.queue_seconds))
        return summaries

    def start_batcher(self) -> None:
        """Create and start the batcher; call from inside the server's event loop."""
        options = self.options
        self.batcher = DynamicBatcher(
            self.run_batch, options.max_batch_size, options.batch_wait_ms / 1000, options.max_queue
        )
        self.batcher.start()

    async def stop_batcher(self) -> None:
        # uvicorn has already waited for requests in flight, so anything still queued has no
        # client left. The timeout only bounds a batch that is stuck in the model.
        if self.batcher is not None:
            await self.batcher.close(timeout_s=10.0)
