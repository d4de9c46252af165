"""The HTTP server, tested against a real uvicorn on 127.0.0.1: OpenAI-compatible
completions and chat (streaming and not), concurrent requests across adapters, runtime
load/unload, LRU eviction, and a 4xx for every bad request with the server still serving."""

import json
import shutil
import threading

import httpx
import pytest
from serving import ServerThread, greedy_alone, save_adapters

import lorakit
from lorakit.serve.engine import build_engine, encode
from lorakit.serve.server import Limits, create_app

BASE = "tiny"


@pytest.fixture(scope="module")
def root(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapters(tiny_lm_dir, root, [2, 8, 4, 6])
    return root


@pytest.fixture(scope="module")
def server(tiny_lm_dir, root):
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=3, max_batch=8)
    app = create_app(engine, BASE, Limits(max_prompt_tokens=64, max_tokens=24, max_queue=64),
                     allow_runtime_lora=True)
    thread = ServerThread(app)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return lorakit.load_tokenizer(str(tiny_lm_dir))


def expected(tiny_lm_dir, root, tokenizer, adapter, prompt_ids, max_tokens):
    """What the adapter alone generates greedily, cut at EOS as the server cuts it."""
    ids = greedy_alone(tiny_lm_dir, root / adapter if adapter != BASE else None, prompt_ids, max_tokens)
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=60, **kwargs)


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [BASE, "a0", "a1", "a2", "a3"]
    assert all(m["parent"] == BASE for m in models["data"][1:])


@pytest.mark.parametrize("model", [BASE, "a1"])
def test_completion_matches_the_adapter_alone(server, tiny_lm_dir, root, tokenizer, model):
    reply = post(server, "/v1/completions", {"model": model, "prompt": "Hej hur mår du", "max_tokens": 8,
                                             "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    prompt_ids = tokenizer("Hej hur mår du")["input_ids"]
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == expected(tiny_lm_dir, root, tokenizer, model, prompt_ids, 8)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


def test_chat_and_streaming_give_the_same_text(server, tiny_lm_dir, root, tokenizer):
    request = {"model": "a2", "messages": [{"role": "user", "content": "Vad gillar du?"}], "max_tokens": 10,
               "temperature": 0}
    whole = post(server, "/v1/chat/completions", request).json()
    text = whole["choices"][0]["message"]["content"]
    prompt_ids = encode(tokenizer, "Vad gillar du?", chat=True)
    assert text == expected(tiny_lm_dir, root, tokenizer, "a2", prompt_ids, 10)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**request, "stream": True},
                      timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_concurrent_requests_for_different_adapters_each_get_their_own_answer(server, tiny_lm_dir, root, tokenizer):
    jobs = [(model, f"fråga {i}") for i, model in enumerate([BASE, "a0", "a1", "a2"] * 3)]
    answers = {}

    def ask(index, model, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        answers[index] = post(server, "/v1/completions", body).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (model, prompt) in enumerate(jobs):
        assert answers[i] == expected(tiny_lm_dir, root, tokenizer, model, tokenizer(prompt)["input_ids"], 6), i


def test_lru_eviction_keeps_serving_more_adapters_than_slots(server):
    for model in ["a0", "a1", "a2", "a3", "a0", "a3"]:  # 4 adapters, 3 slots
        reply = post(server, "/v1/completions", {"model": model, "prompt": "hej", "max_tokens": 2})
        assert reply.status_code == 200, reply.text


def test_load_and_unload_while_requests_are_in_flight(server, root):
    results = []

    def ask():
        body = {"model": "a0", "prompt": "hej då", "max_tokens": 24, "temperature": 0}
        results.append(post(server, "/v1/completions", body).status_code)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "runtime", "lora_path": "a3"}).status_code == 200
    assert post(server, "/v1/completions", {"model": "runtime", "prompt": "hej", "max_tokens": 3}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "runtime"}).status_code == 200
    for t in threads:
        t.join()
    assert results == [200] * 6
    gone = post(server, "/v1/completions", {"model": "runtime", "prompt": "hej", "max_tokens": 3})
    assert gone.status_code == 404


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{not json", 400, "invalid request"),
    ("/v1/completions", {"prompt": "hej"}, 400, "model: Field required"),
    ("/v1/completions", {"model": "nope", "prompt": "hej"}, 404, "no adapter named 'nope'"),
    ("/v1/completions", {"model": "../a0", "prompt": "hej"}, 400, "adapter name '../a0' must be"),
    ("/v1/completions", {"model": BASE, "prompt": "hej " * 100}, 400, "more than this server's limit of 64"),
    ("/v1/completions", {"model": BASE, "prompt": "hej", "max_tokens": 1000}, 400, "max_tokens 1000"),
    ("/v1/completions", {"model": BASE, "prompt": "hej", "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 400, "inside the adapter root"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../.."}, 400, "inside the adapter root"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}, 404, "no adapter named"),
    ("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, "not loaded"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(server, path, body, status, message):
    if isinstance(body, bytes):
        reply = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        reply = post(server, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["code"] == status
    good = post(server, "/v1/completions", {"model": "a1", "prompt": "hej", "max_tokens": 2})
    assert good.status_code == 200


def test_a_corrupt_adapter_fails_only_its_own_request(server, root):
    shutil.copytree(root / "a0", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    try:
        with httpx.Client(timeout=60) as client:
            ok = []
            thread = threading.Thread(target=lambda: ok.append(client.post(
                server.url + "/v1/completions", json={"model": "a2", "prompt": "hej", "max_tokens": 20}).status_code))
            thread.start()
            bad = client.post(server.url + "/v1/completions", json={"model": "broken", "prompt": "hej"})
            thread.join()
        assert bad.status_code == 422 and "not a readable safetensors" in bad.json()["error"]["message"]
        assert ok == [200]
    finally:
        shutil.rmtree(root / "broken")


def test_runtime_loading_is_off_unless_allowed(tiny_lm_dir, root):
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=1)
    thread = ServerThread(create_app(engine, BASE))
    try:
        reply = post(thread, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a0"})
        assert reply.status_code == 403 and "--allow-runtime-lora" in reply.json()["error"]["message"]
    finally:
        thread.stop()


def test_the_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list()} >= {BASE, "a0"}
    completion = client.completions.create(model="a0", prompt="hej", max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hej"}], max_tokens=4,
                                          temperature=0)
    streamed = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hej"}],
                                              max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hej")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_mid_request_frees_its_row_and_slot(stream, tiny_lm_dir, root):
    import time

    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=1)
    engine.eos = set()  # this request could run for 900 tokens: only the hang-up can end it early
    thread = ServerThread(create_app(engine, BASE, Limits(max_tokens=900)))
    try:
        request = {"model": "a3", "prompt": "hej", "max_tokens": 900, "temperature": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", thread.url + "/v1/completions", json=request, timeout=60) as reply:
                next(reply.iter_lines())  # one chunk, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # waits a moment for the whole answer, then hangs up
                httpx.post(thread.url + "/v1/completions", json=request, timeout=0.5)
        cancelled = 'lorakit_requests_total{adapter="a3",finish_reason="cancelled"} 1.0'
        deadline = time.monotonic() + 20
        while cancelled not in httpx.get(thread.url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled in httpx.get(thread.url + "/metrics").text
        assert not engine.rows and engine.store.loaded["a3"].users == 0
        assert post(thread, "/v1/completions", {"model": "a3", "prompt": "hej", "max_tokens": 2}).status_code == 200
    finally:
        thread.stop()


def test_adapter_loads_run_in_a_thread_that_ends_with_them(tiny_lm_dir, root, monkeypatch):
    """A thread that has run a parallel CPU kernel and lives on slows every short kernel of the
    decoding thread (OpenMP keeps its pool): loads never run in a pooled worker thread."""
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=2, max_batch=4)
    loaders = []
    install = engine.store.install

    def recorded(prepared):
        loaders.append(threading.current_thread())
        return install(prepared)

    monkeypatch.setattr(engine.store, "install", recorded)
    thread = ServerThread(create_app(engine, BASE, Limits(max_prompt_tokens=64, max_tokens=8)))
    try:
        reply = post(thread, "/v1/completions", {"model": "a1", "prompt": "hej", "max_tokens": 2})
        assert reply.status_code == 200
        assert post(thread, "/v1/completions", {"model": "a1", "prompt": "hej", "max_tokens": 2}).status_code == 200
    finally:
        thread.stop()
    assert len(loaders) == 1 and loaders[0].name == "lorakit-adapter"  # loaded once, by its own thread
    loaders[0].join(timeout=5)
    assert not loaders[0].is_alive()
