"""A served model under hostile input, against a real uvicorn on 127.0.0.1: one bad
request never hurts another. Each case runs beside a normal request that must come back
with exactly its adapter's text, and afterwards every adapter can still be unloaded."""

import json
import os
import shutil
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ServerThread, greedy_alone, save_adapters

import lorakit
from lorakit.serve.engine import build_engine
from lorakit.serve.server import Limits, create_app

BASE = "tiny"
ADAPTERS = ["a0", "a1", "a2"]


@pytest.fixture(scope="module")
def root(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_adapters(tiny_lm_dir, root, [2, 8, 4])
    return root


@pytest.fixture(scope="module")
def server(tiny_lm_dir, root):
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=3, max_batch=8)
    engine.eos = set()  # every normal request runs to max_tokens: long enough to overlap the hostile one
    app = create_app(engine, BASE, Limits(max_prompt_tokens=64, max_tokens=16, max_queue=4096),
                     allow_runtime_lora=True)
    thread = ServerThread(app)
    thread.engine = engine
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def expected_text(tiny_lm_dir, root):
    tokenizer = lorakit.load_tokenizer(str(tiny_lm_dir))
    cache = {}

    def text(adapter, prompt, max_tokens=16):
        if (adapter, prompt) not in cache:
            ids = greedy_alone(tiny_lm_dir, None if adapter == BASE else root / adapter,
                               tokenizer(prompt)["input_ids"], max_tokens)
            cache[adapter, prompt] = tokenizer.decode(ids, skip_special_tokens=True)
        return cache[adapter, prompt]
    return text


class Bystander:
    """A normal request in flight while something hostile happens."""

    def __init__(self, server, adapter="a1", prompt="Hej hur mår du"):
        self.adapter, self.prompt, self.reply = adapter, prompt, None
        body = {"model": adapter, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        self.thread = threading.Thread(target=self._ask, args=(server, body))
        self.thread.start()

    def _ask(self, server, body):
        self.reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    def check(self, expected_text):
        self.thread.join(timeout=120)
        assert self.reply is not None and self.reply.status_code == 200, self.reply and self.reply.text
        assert self.reply.json()["choices"][0]["text"] == expected_text(self.adapter, self.prompt)


def all_unloadable(server):
    """Every adapter unloads (none leaked a slot), and loads again for the next test."""
    engine = server.engine
    for name in sorted(engine.store.extra):  # registered at runtime: unload
        if name not in ADAPTERS:
            assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    for name in sorted(engine.store.unloaded & set(ADAPTERS)):  # unloaded by a test: load again first
        httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}, timeout=30)
    for name in ADAPTERS:
        reply = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
        assert reply.status_code == 200, reply.text
    assert not engine.store.loaded and not engine.rows
    for name in ADAPTERS:
        reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name},
                           timeout=30)
        assert reply.status_code == 200, reply.text


def assert_json_error(reply, status, message):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and message in error["message"], error


def test_an_empty_prompt_is_refused_and_hurts_no_one(server, expected_text):
    """It used to crash the batch it joined, hang alone, and leak its adapter's slot."""
    bystander = Bystander(server)
    for body in ({"model": "a2", "prompt": "", "max_tokens": 8}, {"model": BASE, "prompt": [], "max_tokens": 8},
                 {"model": "a0", "prompt": ["hej", ""], "max_tokens": 8}):
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert_json_error(reply, 400, "prompt")
    bystander.check(expected_text)
    all_unloadable(server)


def test_a_huge_seed_is_a_400_and_leaks_no_slot(server, expected_text):
    bystander = Bystander(server)
    reply = httpx.post(server.url + "/v1/completions", json={"model": "a2", "prompt": "hej", "temperature": 1.0,
                                                             "seed": 100000000000000000000000}, timeout=30)
    assert_json_error(reply, 400, "seed")
    bystander.check(expected_text)
    all_unloadable(server)


def test_control_characters_in_names_and_paths_are_a_400_on_a_kept_connection(server, expected_text):
    bystander = Bystander(server)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a0\u0000"})
        assert_json_error(reply, 400, "control characters")
        assert reply.headers.get("connection") != "close"
        assert_json_error(client.post("/v1/completions", json={"model": "a0\u0000", "prompt": "hej"}), 400,
                          "adapter name")
        assert client.get("/health").json() == {"status": "ok"}  # the same connection still serves
    bystander.check(expected_text)
    all_unloadable(server)


def test_a_weight_file_linked_outside_the_root_is_refused_and_not_listed(server, root, tmp_path, expected_text):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(root / "a0" / "adapter_model.safetensors", outside)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    shutil.copy(root / "a0" / "adapter_config.json", sneaky / "adapter_config.json")
    os.symlink(outside, sneaky / "adapter_model.safetensors")
    try:
        bystander = Bystander(server)
        reply = httpx.post(server.url + "/v1/completions", json={"model": "sneaky", "prompt": "hej"}, timeout=30)
        assert_json_error(reply, 400, "leads outside the adapter root")
        reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "s", "lora_path": "sneaky"})
        assert_json_error(reply, 400, "leads outside the adapter root")
        assert "sneaky" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        bystander.check(expected_text)
    finally:
        shutil.rmtree(sneaky)
    all_unloadable(server)


@pytest.mark.parametrize("change, message", [
    ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"ignore_eos": 1}, "ignore_eos: Input should be a valid boolean"),
    ({"stop": [""]}, "stop"),
    ({"temperature": "0.5"}, "temperature"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"logit_bias": {"5": 100}}, "logit_bias: unsupported field"),
    ({"best_of": 2}, "best_of: unsupported field"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"stream": True, "logprobs": 1}, "logprobs: not available with stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options: only with stream"),
    ({"max_tokens": 0}, "max_tokens: 0 generates nothing"),
    ({"prompt": [5, 100000]}, "outside the vocabulary"),
])
def test_loose_completion_fields_are_a_400_naming_the_field(server, change, message, expected_text):
    bystander = Bystander(server)
    reply = httpx.post(server.url + "/v1/completions", json={"model": "a0", "prompt": "hej", **change}, timeout=30)
    assert_json_error(reply, 400, message)
    bystander.check(expected_text)


@pytest.mark.parametrize("change, message", [
    ({"messages": [{"role": "bogus", "content": "hej"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"top_logprobs": 2}, "top_logprobs: needs logprobs"),
    ({"functions": []}, "functions: unsupported field"),
])
def test_loose_chat_fields_are_a_400_naming_the_field(server, change, message):
    body = {"model": "a0", "messages": [{"role": "user", "content": "hej"}], **change}
    assert_json_error(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30), 400, message)


def test_models_lists_only_adapters_that_load_with_vllm_metadata(server, root, tiny_lm_dir):
    shutil.copytree(root / "a0", root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    other = tiny_lm_dir.parent / "misfit-adapters"
    if not other.exists():
        model = lorakit.load_model(str(tiny_lm_dir))
        lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["q_proj"]))
        lorakit.save_adapter(model, other)
    shutil.copytree(other, root / "misfit")
    config = json.loads((root / "misfit" / "adapter_config.json").read_text())
    (root / "misfit" / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))  # shapes say 3
    try:
        data = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in data] == [BASE, "a0", "a1", "a2"]
        assert {m["id"]: (m["parent"], m["root"], m["rank"]) for m in data[1:]} == {
            "a0": (BASE, "a0", 2), "a1": (BASE, "a1", 8), "a2": (BASE, "a2", 4)}
    finally:
        shutil.rmtree(root / "pickled")
        shutil.rmtree(root / "misfit")


@pytest.mark.parametrize("name", ["a/../../x", "../a0", ".hidden", "a\nb"])
def test_runtime_names_outside_the_safe_set_are_refused(server, name):
    reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a0"})
    assert_json_error(reply, 400, "adapter name")


def test_an_unloaded_root_adapter_stays_unloaded_until_loaded_again(server, expected_text):
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    gone = httpx.post(server.url + "/v1/completions", json={"model": "a2", "prompt": "hej", "max_tokens": 2})
    assert_json_error(gone, 404, "was unloaded; load it again")
    assert "a2" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert_json_error(httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a2"}), 404,
                      "not loaded")
    back = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert back.status_code == 200
    reply = httpx.post(server.url + "/v1/completions", json={"model": "a2", "prompt": "Hej hur mår du",
                                                             "max_tokens": 16, "temperature": 0})
    assert reply.json()["choices"][0]["text"] == expected_text("a2", "Hej hur mår du")


def test_unknown_routes_and_methods_answer_with_the_json_error(server):
    assert_json_error(httpx.get(server.url + "/v1/nothing"), 404, "Not Found")
    assert_json_error(httpx.get(server.url + "/v1/completions"), 405, "Method Not Allowed")


def test_a_missing_adapter_root_stops_the_server_at_startup(tmp_path, tiny_lm_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lorakit", "serve", str(tiny_lm_dir), "--adapters",
                             str(tmp_path / "nonexistent")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"adapter root {tmp_path / 'nonexistent'} is not a directory" in result.stderr


# -- fuzzing: random bodies beside normal traffic ------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
          "logprobs", "echo", "top_logprobs", "max_completion_tokens", "stream_options", "frequency_penalty",
          "presence_penalty", "lora_name", "lora_path", "user", "role", "content"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["", "a0", "a1", "tiny", "../a0", "a0\u0000", "\u202e", "\x07", "a/../../x", "hej"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=3),
                      max_leaves=8)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=7)
paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                         "/v1/unload_lora_adapter"])


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=paths, body=bodies, base=st.sampled_from([{}, {"model": "a0", "prompt": "hej"},
                                                      {"model": "a1", "messages": [{"role": "user", "content": "x"}]}]))
def test_fuzzed_bodies_never_get_a_5xx_or_hurt_normal_traffic(fuzz_server, path, body, base):
    server, bystanders = fuzz_server
    reply = httpx.post(server.url + path, json={**base, **body}, timeout=60)
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) == {"message", "type", "code"}
    elif not reply.headers["content-type"].startswith("text/event-stream"):
        reply.json()
    # on the base model, which no fuzzed unload can take away
    bystanders.append(Bystander(server, adapter=BASE, prompt="fråga"))


@pytest.fixture(scope="module")
def fuzz_server(server, expected_text):
    bystanders = []
    yield server, bystanders
    assert len(bystanders) >= 100
    for bystander in bystanders:
        bystander.check(expected_text)
    all_unloadable(server)


def test_an_unexpected_exception_is_a_json_500_and_the_next_request_is_served(tiny_lm_dir, root):
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=1)
    thread = ServerThread(create_app(engine, BASE))
    tokenizer = engine.tokenizer
    try:
        engine.tokenizer = None  # tokenizing the next prompt raises inside the handler
        reply = httpx.post(thread.url + "/v1/completions", json={"model": BASE, "prompt": "hej", "max_tokens": 2})
        assert_json_error(reply, 500, "internal error: TypeError")
        engine.tokenizer = tokenizer
        reply = httpx.post(thread.url + "/v1/completions", json={"model": BASE, "prompt": "hej", "max_tokens": 2})
        assert reply.status_code == 200
    finally:
        thread.stop()
