"""DynamicBatcher with a fake model: grouping, limits, errors and shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loratune.config import GenerationSettings
from loratune.evaluate.generation import Generated
from loratune.serve.batching import BatcherClosedError, DynamicBatcher, QueueFullError

GREEDY = GenerationSettings(max_new_tokens=4)


class FakeModel:
    """Records each batch and echoes the prompts. Each batch waits until ``release`` is set."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[list[int]]] = []
        self.settings: list[GenerationSettings] = []
        self.fail = fail
        self.release = threading.Event()
        self.release.set()

    def __call__(self, prompts, settings):
        self.release.wait(timeout=10)
        self.batches.append(prompts)
        self.settings.append(settings)
        if self.fail:
            raise RuntimeError("model exploded")
        return [Generated(text=" ".join(map(str, prompt)), prompt_tokens=len(prompt), new_tokens=1) for prompt in prompts]


def _run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_prompts_share_batches():
    model = FakeModel()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.05, max_queue=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([[i]], GREEDY) for i in range(10)))
        await batcher.close()
        return batcher, results

    batcher, results = _run(scenario())

    assert [result[0].generated.text for result in results] == [str(i) for i in range(10)]
    assert [len(batch) for batch in model.batches] == [4, 4, 2]
    assert batcher.batches_run == 3
    assert batcher.prompts_run == 10
    assert all(settings.batch_size == len(batch) for settings, batch in zip(model.settings, model.batches))


def test_batch_size_one_runs_prompts_alone():
    model = FakeModel()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.05, max_queue=100)
        batcher.start()
        await asyncio.gather(*(batcher.submit([[i]], GREEDY) for i in range(5)))
        await batcher.close()

    _run(scenario())

    assert [len(batch) for batch in model.batches] == [1, 1, 1, 1, 1]


def test_waiting_prompts_join_next_batch():
    model = FakeModel()
    model.release.clear()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0, max_queue=100)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([[0]], GREEDY))
        await asyncio.sleep(0.05)  # the first prompt is now running alone
        rest = [asyncio.ensure_future(batcher.submit([[i]], GREEDY)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        model.release.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    _run(scenario())

    assert [len(batch) for batch in model.batches] == [1, 5]


def test_different_settings_never_share_a_call():
    model = FakeModel()
    sampled = GREEDY.model_copy(update={"do_sample": True, "temperature": 0.7})

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.05, max_queue=100)
        batcher.start()
        await asyncio.gather(
            batcher.submit([[1], [2]], GREEDY), batcher.submit([[3]], sampled), batcher.submit([[4]], GREEDY)
        )
        await batcher.close()

    _run(scenario())

    assert sorted(model.batches) == [[[1], [2], [4]], [[3]]]
    for settings, batch in zip(model.settings, model.batches):
        assert settings.do_sample == (batch == [[3]])


def test_model_error_reaches_every_waiting_request():
    model = FakeModel(fail=True)

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.01, max_queue=100)
        batcher.start()
        outcomes = await asyncio.gather(batcher.submit([[1]], GREEDY), batcher.submit([[2]], GREEDY), return_exceptions=True)
        # The collector survives a failed batch and serves the next one.
        model.fail = False
        after = await batcher.submit([[3]], GREEDY)
        await batcher.close()
        return outcomes, after

    outcomes, after = _run(scenario())

    assert all(isinstance(outcome, RuntimeError) and "exploded" in str(outcome) for outcome in outcomes)
    assert after[0].generated.text == "3"


def test_full_queue_rejects_request():
    model = FakeModel()
    model.release.clear()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([[0]], GREEDY))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="at most 2"):
            await batcher.submit([[1], [2], [3]], GREEDY)
        model.release.set()
        await running
        await batcher.close()

    _run(scenario())


def test_close_finishes_queued_prompts():
    model = FakeModel()
    model.release.clear()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([[0]], GREEDY))
        queued = asyncio.ensure_future(batcher.submit([[1]], GREEDY))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close(timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosedError):
            await batcher.submit([[2]], GREEDY)
        model.release.set()
        await closing
        return await asyncio.gather(running, queued)

    running, queued = _run(scenario())

    assert running[0].generated.text == "0"
    assert queued[0].generated.text == "1"
    assert model.batches == [[[0]], [[1]]]


def test_close_timeout_fails_stuck_prompts():
    model = FakeModel()
    model.release.clear()

    async def scenario():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([[0]], GREEDY))
        queued = asyncio.ensure_future(batcher.submit([[1]], GREEDY))
        await asyncio.sleep(0.05)
        await batcher.close(timeout_s=0.05)
        return await asyncio.gather(running, queued, return_exceptions=True)

    try:
        running, queued = _run(scenario())
    finally:
        model.release.set()

    assert isinstance(running, BatcherClosedError)
    assert isinstance(queued, BatcherClosedError)


def test_batcher_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(FakeModel(), max_batch_size=0, max_wait_s=0.0, max_queue=1)
    with pytest.raises(ValueError, match="max_wait_s"):
        DynamicBatcher(FakeModel(), max_batch_size=1, max_wait_s=-1.0, max_queue=1)
