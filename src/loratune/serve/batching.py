"""Dynamic batching: prompts from concurrent requests share one ``generate`` call.

Requests put prompts on an asyncio queue. A collector task takes the first waiting prompt,
waits up to ``max_wait_s`` for more (or until ``max_batch_size`` are waiting), and hands the
batch to one worker thread that runs the model. Prompts with different generation settings
never share a call, so a batch is split into groups of equal settings, run one after another.
While the model runs, new prompts queue up and form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from loratune.config import GenerationSettings
from loratune.evaluate.generation import Generated

logger = logging.getLogger(__name__)

# Runs the model on a list of prompts (token ids) with one settings object, in the worker thread.
RunBatch = Callable[[list[list[int]], GenerationSettings], list[Generated]]


class QueueFullError(RuntimeError):
    """Raised when accepting a request would put more prompts in the queue than allowed."""


class BatcherClosedError(RuntimeError):
    """Raised for prompts submitted after shutdown began, or still queued when it ended."""


@dataclass
class BatchResult:
    """One generated text plus how long its prompt waited and how large its batch was."""

    generated: Generated
    queue_seconds: float
    batch_size: int


@dataclass
class _Item:
    prompt: list[int]
    settings: GenerationSettings
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


# Queued by ``close``: the collector finishes the prompts ahead of it, then returns.
_STOP = object()


def _settings_key(settings: GenerationSettings) -> tuple:
    return tuple(sorted(settings.model_dump(exclude={"batch_size"}).items()))


class DynamicBatcher:
    """Group prompts from concurrent requests into batches for one model worker thread.

    ``max_batch_size=1`` turns batching off: every prompt runs alone, in arrival order.
    Create it inside a running event loop and call ``start`` before ``submit``.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_wait_s: float, max_queue: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches_run = 0
        self.prompts_run = 0
        self._queue: asyncio.Queue = asyncio.Queue()  # _Item objects, then _STOP
        self._enough_waiting = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratune-model")
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name="loratune-batcher")

    async def submit(self, prompts: Sequence[list[int]], settings: GenerationSettings) -> list[BatchResult]:
        """Queue ``prompts`` and wait for their results, in the order given."""
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        if self._queue.qsize() + len(prompts) > self.max_queue:
            raise QueueFullError(
                f"the server has {self._queue.qsize()} prompts waiting and accepts at most "
                f"{self.max_queue}; retry later"
            )
        loop = asyncio.get_running_loop()
        items = [_Item(list(prompt), settings, loop.create_future()) for prompt in prompts]
        for item in items:
            self._queue.put_nowait(item)
        if self._queue.qsize() >= self.max_batch_size - 1:
            self._enough_waiting.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop taking prompts, finish the queued ones, then stop the worker thread.

        After ``timeout_s`` seconds the rest are failed with ``BatcherClosedError`` instead.
        The server calls this after requests in flight have finished, so normally the queue
        is already empty.
        """
        self._closed = True
        self._queue.put_nowait(_STOP)
        self._enough_waiting.set()
        finished = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                finished = False
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        left = 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP and not item.future.done():
                item.future.set_exception(BatcherClosedError("the server shut down before this prompt ran"))
                left += 1
        if left:
            logger.warning("Shutdown: %d queued prompts were not run", left)
        # A batch that outlived the timeout keeps running in the worker thread; don't wait for it.
        self._executor.shutdown(wait=finished, cancel_futures=True)

    async def _collect_forever(self) -> None:
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            if self.max_wait_s > 0 and self._queue.qsize() < self.max_batch_size - 1:
                self._enough_waiting.clear()
                try:
                    await asyncio.wait_for(self._enough_waiting.wait(), self.max_wait_s)
                except asyncio.TimeoutError:
                    pass
            while len(batch) < self.max_batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            await self._run(batch)
            if stop:
                return

    async def _run(self, batch: list[_Item]) -> None:
        groups: dict[tuple, list[_Item]] = {}
        for item in batch:
            groups.setdefault(_settings_key(item.settings), []).append(item)
        loop = asyncio.get_running_loop()
        for items in groups.values():
            live = [item for item in items if not item.future.done()]
            if not live:
                continue
            started = time.perf_counter()
            settings = live[0].settings.model_copy(update={"batch_size": len(live)})
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.run_batch, [item.prompt for item in live], settings
                )
            except asyncio.CancelledError:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(BatcherClosedError("the server shut down while this prompt ran"))
                raise
            except Exception as error:  # report to the waiting requests instead of killing the loop
                logger.exception("Generation failed for a batch of %d prompts", len(live))
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.batches_run += 1
            self.prompts_run += len(live)
            logger.debug("Ran a batch of %d prompts in %.3f s", len(live), time.perf_counter() - started)
            for item, output in zip(live, outputs):
                if not item.future.done():
                    item.future.set_result(BatchResult(output, started - item.enqueued, len(live)))
