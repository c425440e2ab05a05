"""The HTTP server, started with uvicorn on a loopback port and called over HTTP with httpx."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import running_server

from loratune.config import GenerationSettings
from loratune.data.formatting import encode_prompt
from loratune.data.loading import DEMO_DIR, read_rows
from loratune.evaluate.generation import generate
from loratune.serve.app import create_app
from loratune.serve.schemas import ServeLimits
import loratune.serve.service as service_module
from loratune.serve.service import ServeOptions, SummarizerService

DEFAULTS = GenerationSettings(max_new_tokens=8, batch_size=4)
LIMITS = ServeLimits(max_body_bytes=20_000, max_texts=4, max_input_tokens=300, max_new_tokens=16, max_num_beams=2)
TEXTS = [row["dialogue"] for row in read_rows(DEMO_DIR / "test.jsonl")]


def _options(**changes) -> ServeOptions:
    values = {"model_name": "tiny", "limits": LIMITS, "defaults": DEFAULTS, "max_batch_size": 8, "batch_wait_ms": 20.0}
    return ServeOptions(**{**values, **changes})


def _direct(loaded, texts: list[str], settings: GenerationSettings = DEFAULTS) -> list[str]:
    """Summaries from generate() itself, all texts in one call, as one server batch runs them."""
    prompts = [encode_prompt(loaded.tokenizer, loaded.prompt, text, loaded.max_source_length)[0] for text in texts]
    settings = settings.model_copy(update={"batch_size": len(prompts)})
    return [item.text for item in generate(loaded.model, loaded.tokenizer, prompts, loaded.family, settings)]


@pytest.fixture(scope="module")
def server(loaded_chat_run):
    with running_server(create_app(loaded_chat_run, _options(), {"base_model": "tiny-llama"})) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def _error(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def test_health_and_models(server):
    health = server.get("/health")
    models = server.get("/v1/models")

    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert models.status_code == 200
    card = models.json()["data"][0]
    assert card["id"] == "tiny"
    assert card["base_model"] == "tiny-llama"
    assert card["chat"] is True
    assert card["limits"]["max_texts"] == 4


def test_summarize_single_text(server, loaded_chat_run):
    response = server.post("/v1/summarize", json={"text": TEXTS[0]})

    assert response.status_code == 200, response.text
    body = response.json()
    (item,) = body["summaries"]
    assert item["summary"] == _direct(loaded_chat_run, [TEXTS[0]])[0]
    assert item["summary"]
    assert item["new_tokens"] == 8
    assert item["finish_reason"] == "length"
    assert item["input_truncated"] is False
    assert body["usage"]["completion_tokens"] == 8
    assert body["timing"]["total_ms"] >= body["timing"]["queue_ms"] >= 0
    assert body["id"] == response.headers["x-request-id"]


def test_summarize_batch_in_order(server, loaded_chat_run):
    texts = TEXTS[1:4]
    response = server.post("/v1/summarize", json={"text": texts, "max_new_tokens": 6})

    assert response.status_code == 200, response.text
    summaries = [item["summary"] for item in response.json()["summaries"]]
    assert summaries == _direct(loaded_chat_run, texts, DEFAULTS.model_copy(update={"max_new_tokens": 6}))
    assert all(item["new_tokens"] <= 6 for item in response.json()["summaries"])


def test_text_cleaned_like_predict(loaded_chat_run, monkeypatch):
    seen = []
    real_encode_prompt = service_module.encode_prompt

    def spy(tokenizer, fmt, text, max_length):
        seen.append(text)
        return real_encode_prompt(tokenizer, fmt, text, max_length)

    monkeypatch.setattr(service_module, "encode_prompt", spy)
    SummarizerService(loaded_chat_run, _options()).encode(["  Anna: hi\r\nBen: hello \n"])

    assert seen == ["Anna: hi\nBen: hello"]


def test_single_requests_match_predict_batch_of_one(server, loaded_chat_run):
    for text in TEXTS[:6]:
        response = server.post("/v1/summarize", json={"text": text})
        assert response.json()["summaries"][0]["summary"] == _direct(loaded_chat_run, [text])[0]


def test_concurrent_requests_are_batched(server):
    before = server.get("/health").json()

    def call(index: int) -> httpx.Response:
        return server.post("/v1/summarize", json={"text": TEXTS[index % len(TEXTS)]})

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(call, range(32)))

    after = server.get("/health").json()
    assert [response.status_code for response in responses] == [200] * 32
    assert all(response.json()["summaries"][0]["summary"] for response in responses)
    prompts = after["prompts_run"] - before["prompts_run"]
    batches = after["batches_run"] - before["batches_run"]
    assert prompts == 32
    assert batches < prompts  # at least one generate() call served several requests
    assert len({response.headers["x-request-id"] for response in responses}) == 32


def test_completions_endpoint(server, loaded_chat_run):
    response = server.post("/v1/completions", json={"model": "tiny", "prompt": [TEXTS[0], TEXTS[1]], "max_tokens": 8, "temperature": 0})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert [choice["text"] for choice in body["choices"]] == _direct(loaded_chat_run, TEXTS[:2])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_chat_completions_endpoint(server, loaded_chat_run):
    response = server.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": TEXTS[2]}]})

    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == _direct(loaded_chat_run, [TEXTS[2]])[0]


def test_sampling_request_succeeds(server):
    response = server.post("/v1/summarize", json={"text": TEXTS[0], "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert response.status_code == 200, response.text
    assert response.json()["summaries"][0]["new_tokens"] > 0


BAD_REQUESTS = [
    ("/v1/summarize", {"text": ""}, 422, "text 0 is empty"),
    ("/v1/summarize", {"text": []}, 422, "no texts"),
    ("/v1/summarize", {"texts": "hi"}, 422, "texts: unknown field"),
    ("/v1/summarize", {"text": 5}, 422, "text"),
    ("/v1/summarize", {"text": ["a"] * 5}, 422, "server limit is 4"),
    ("/v1/summarize", {"text": "word " * 400}, 422, "has 400 tokens"),
    ("/v1/summarize", {"text": "hi", "max_new_tokens": 17}, 422, "above the server limit of 16"),
    ("/v1/summarize", {"text": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/v1/summarize", {"text": "hi", "num_beams": 3}, 422, "num_beams: 3"),
    ("/v1/summarize", {"text": "hi", "temperature": 5}, 422, "temperature"),
    ("/v1/summarize", {"text": "hi", "do_sample": True, "num_beams": 2}, 422, "choose one"),
    ("/v1/completions", {"prompt": "hi", "stream": True}, 422, "streaming is not supported"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 422, "only 1 choice"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' not found"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
     422, "exactly one message"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
]


@pytest.mark.parametrize(("path", "payload", "status", "message"), BAD_REQUESTS)
def test_bad_request_rejected(server, path, payload, status, message):
    response = server.post(path, json=payload)

    assert response.status_code == status, response.text
    assert message in _error(response)


def test_malformed_json_rejected(server):
    response = server.post("/v1/summarize", content=b'{"text": "hi"', headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert "invalid JSON" in _error(response)


def test_non_json_body_rejected(server):
    response = server.post("/v1/summarize", content=b"text=hi", headers={"content-type": "application/x-www-form-urlencoded"})

    assert response.status_code == 415
    assert "Content-Type: application/json" in _error(response)


def test_oversized_body_rejected(server):
    declared = server.post("/v1/summarize", json={"text": "x" * 30_000})

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    chunked = server.post("/v1/summarize", content=chunks(), headers={"content-type": "application/json"})

    assert declared.status_code == 413
    assert "20000 bytes" in _error(declared)
    assert chunked.status_code == 413


def test_unknown_route_and_method(server):
    assert server.get("/v1/nothing").status_code == 404
    assert server.get("/v1/summarize").status_code == 405
    assert "error" in server.get("/v1/nothing").json()


def test_request_id_is_logged(server, caplog):
    with caplog.at_level(logging.INFO, logger="loratune.serve"):
        response = server.post("/v1/summarize", json={"text": "hi"}, headers={"x-request-id": "trace-42"})
        time.sleep(0.1)  # the server thread logs after sending the response

    assert response.headers["x-request-id"] == "trace-42"
    assert any(record.getMessage().startswith("trace-42 POST /v1/summarize -> 200") for record in caplog.records)


def test_api_key_required_except_health(loaded_chat_run):
    app = create_app(loaded_chat_run, _options(api_key="s3cret"))
    with running_server(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        missing = client.get("/v1/models")
        assert missing.status_code == 401
        assert "missing API key" in _error(missing)
        assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/summarize", json={"text": "hi"}).status_code == 401
        assert client.get("/docs").status_code == 401
        assert client.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        summarized = client.post("/v1/summarize", json={"text": "hi"}, headers={"x-api-key": "s3cret"})
        assert summarized.status_code == 200


def test_full_queue_answers_503(loaded_chat_run):
    app = create_app(loaded_chat_run, _options(max_queue=2))
    with running_server(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/v1/summarize", json={"text": ["a b", "c d", "e f"]})

    assert response.status_code == 503
    assert "retry later" in _error(response)


def test_chat_unavailable_without_chat_template(tiny_llama_plain_dir):
    from loratune.models.inference import load_for_inference

    loaded = load_for_inference(str(tiny_llama_plain_dir))
    with running_server(create_app(loaded, _options())) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        completion = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})

    assert chat.status_code == 404
    assert "no chat template" in _error(chat)
    assert completion.status_code == 200


def test_shutdown_finishes_requests_in_flight(loaded_chat_run):
    app = create_app(loaded_chat_run, _options())
    service = app.state.service
    started = threading.Event()
    real_run_batch = service.run_batch

    def slow_run_batch(prompts, settings):
        started.set()
        time.sleep(0.5)
        return real_run_batch(prompts, settings)

    service.run_batch = slow_run_batch
    with running_server(app) as (url, server):
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(httpx.post, f"{url}/v1/summarize", json={"text": TEXTS[0]}, timeout=30)
            assert started.wait(timeout=10)
            server.should_exit = True
            response = future.result(timeout=30)
        refused = False
        deadline = time.monotonic() + 10
        while not refused and time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/health", timeout=2)
            except httpx.ConnectError:
                refused = True
            time.sleep(0.02)

    assert refused
    assert response.status_code == 200
    assert response.json()["summaries"][0]["summary"]
    assert json.loads(response.text)["summaries"][0]["new_tokens"] == 8


def test_shutdown_timeout_answers_503(loaded_chat_run):
    app = create_app(loaded_chat_run, _options())
    service = app.state.service
    started = threading.Event()
    real_run_batch = service.run_batch

    def slow_run_batch(prompts, settings):
        started.set()
        time.sleep(1.5)
        return real_run_batch(prompts, settings)

    service.run_batch = slow_run_batch
    with running_server(app, shutdown_timeout_s=0.2) as (url, server):
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(httpx.post, f"{url}/v1/summarize", json={"text": TEXTS[0]}, timeout=30)
            assert started.wait(timeout=10)
            server.should_exit = True
            response = future.result(timeout=30)

    assert response.status_code == 503
    assert "shut down" in _error(response)
