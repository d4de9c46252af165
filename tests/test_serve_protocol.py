"""OpenAI semantics that clients and evaluation harnesses rely on, against a real
uvicorn on 127.0.0.1: logprobs and echo equal the model's own log-probabilities, n,
penalties, max_completion_tokens, stream_options.include_usage, /metrics, and a
bounded shutdown on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from serving import ServerThread, alone, free_port, greedy_alone, save_adapters

import lorakit
from lorakit.serve.engine import build_engine
from lorakit.serve.server import Limits, create_app

BASE = "tiny"


@pytest.fixture(scope="module")
def root(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    save_adapters(tiny_lm_dir, root, [4, 8])
    return root


@pytest.fixture(scope="module")
def server(tiny_lm_dir, root):
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=2, max_batch=8)
    engine.eos = set()  # a random model: run every request to its max_tokens
    thread = ServerThread(create_app(engine, BASE, Limits(max_prompt_tokens=64, max_tokens=16)))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return lorakit.load_tokenizer(str(tiny_lm_dir))


def post(server, path, body):
    reply = httpx.post(server.url + path, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def reference_logprobs(tiny_lm_dir, adapter_dir, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, and the log-softmax at every position, from the
    adapter alone (lorakit's LoRA layers, one sequence, no cache)."""
    model = alone(tiny_lm_dir, adapter_dir)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))], logp


def test_echo_and_logprobs_equal_the_models_own(server, tiny_lm_dir, root, tokenizer):
    prompt = "Hej hur mår du idag"
    body = post(server, "/v1/completions", {"model": "a1", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                                            "logprobs": 3, "echo": True})
    choice = body["choices"][0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 4 == body["usage"]["prompt_tokens"] + 4
    assert choice["text"].startswith(prompt)
    generated = greedy_alone(tiny_lm_dir, root / "a1", prompt_ids, 4)
    assert choice["text"] == prompt + tokenizer.decode(generated, skip_special_tokens=True)
    expected, logp = reference_logprobs(tiny_lm_dir, root / "a1", prompt_ids + generated)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):
        best = logp[position].topk(3)  # OpenAI's format keys by text: tokens that read alike share a key
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert all(any(abs(v - b) < 1e-4 for b in best.values.tolist()) for v in top.values())
    # greedy: every generated token is the most likely one
    for value, top in zip(logprobs["token_logprobs"][-4:], logprobs["top_logprobs"][-4:]):
        assert value == pytest.approx(max(top.values()), abs=1e-6)
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_echo_with_zero_max_tokens_scores_the_prompt_only(server, tiny_lm_dir, root, tokenizer):
    """What lm-eval's loglikelihood requests ask."""
    ids = tokenizer("Vad gillar du att göra")["input_ids"]
    body = post(server, "/v1/completions", {"model": BASE, "prompt": ids, "max_tokens": 0, "logprobs": 0,
                                            "echo": True})
    choice = body["choices"][0]
    expected, _ = reference_logprobs(tiny_lm_dir, None, ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert choice["text"] == tokenizer.decode(ids)


def test_chat_logprobs_and_max_completion_tokens(server):
    body = post(server, "/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hej"}],
                                                 "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2,
                                                 "temperature": 0})
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 3 and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)


def test_n_choices_are_distinct_samples_that_a_seed_repeats(server):
    request = {"model": "a0", "prompt": ["hej", "tack"], "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7}
    first, second = post(server, "/v1/completions", request), post(server, "/v1/completions", request)
    assert [c["index"] for c in first["choices"]] == list(range(6))
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert len(set(texts[:3])) > 1
    assert first["usage"]["completion_tokens"] == 36


def test_frequency_and_presence_penalties_follow_openais_definition(server, tiny_lm_dir, root, tokenizer):
    prompt = tokenizer("hej hej")["input_ids"]
    body = post(server, "/v1/completions", {"model": "a1", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                            "frequency_penalty": 1.5, "presence_penalty": 0.5})
    model = alone(tiny_lm_dir, root / "a1")
    ids, generated = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
            token = int((logits - 1.5 * counts - 0.5 * (counts > 0).float()).argmax())
            ids.append(token)
            generated.append(token)
    assert body["choices"][0]["text"] == tokenizer.decode(generated, skip_special_tokens=True)
    plain = post(server, "/v1/completions", {"model": "a1", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert plain["choices"][0]["text"] != body["choices"][0]["text"]


def test_stream_options_include_usage_sends_a_last_usage_chunk(server):
    request = {"model": "a0", "messages": [{"role": "user", "content": "hej"}], "max_tokens": 5, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=request, timeout=60) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert all("usage" not in json.loads(e) for e in events[:-2])


def test_metrics_in_prometheus_format(server):
    post(server, "/v1/completions", {"model": "a1", "prompt": "hej", "max_tokens": 3})
    text = httpx.get(server.url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("lorakit_requests_running", "lorakit_requests_waiting", "lorakit_generation_tokens",
                 "lorakit_generation_tokens_per_second", "lorakit_adapter_loads", "lorakit_adapter_evictions",
                 "lorakit_time_to_first_token_seconds", "lorakit_time_per_output_token_seconds", "lorakit_requests"):
        assert name in families, name
    done = {s.labels["adapter"]: s.value for s in families["lorakit_requests"].samples
            if s.name == "lorakit_requests_total" and s.labels["finish_reason"] == "length"}
    assert done["a1"] >= 1
    assert families["lorakit_adapter_loads"].samples[0].value >= 1
    counts = [s.value for s in families["lorakit_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert counts[0] >= 1


def test_sigterm_answers_what_is_in_flight_and_exits_in_bounded_time(tiny_lm_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", str(tiny_lm_dir), "--port", str(port),
                                "--max-tokens", "512", "--shutdown-timeout", "2", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        request = {"model": str(tiny_lm_dir.name), "prompt": "hej", "max_tokens": 512, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=request, timeout=60) as reply:
            lines = reply.iter_lines()
            events.append(next(lines))
            os.kill(process.pid, signal.SIGTERM)
            sent = time.monotonic()
            events += list(lines)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - sent < 15
        data = [e[6:] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]"  # answered: finished, or cancelled when the grace period ran out
        assert json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length", "cancelled")
    finally:
        process.kill()
        process.wait()


def test_a_taken_port_stops_the_server_with_an_error(tiny_lm_dir):
    """The HTTP server runs in a second thread and the engine in the first: when HTTP cannot
    start, the engine's loop must end too, and the process exit with an error."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "lorakit", "serve", str(tiny_lm_dir), "--port", str(port),
                                 "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()


def test_ignore_eos_is_taken_as_vllm_takes_it(server):
    body = post(server, "/v1/completions", {"model": "a0", "prompt": "Hej", "max_tokens": 5, "temperature": 0,
                                            "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    chat = post(server, "/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "Hej"}],
                                                 "max_completion_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert chat["usage"]["completion_tokens"] == 3
