"""A bounded soak test of the server (slow: ``make test-slow``): 2,000 requests, 32 at a
time, across 16 adapters; 5 % hostile, clients that hang up mid-stream, and a runtime
load or unload every 100 requests. Normal requests must all come back right, nothing
may be lost, and memory must settle."""

import asyncio
import collections
import random

import httpx
import pytest
from serving import ServerThread, save_adapters

from lorakit.serve.engine import build_engine
from lorakit.serve.server import Limits, create_app

pytestmark = pytest.mark.slow

HOSTILE = [
    {"prompt": ""}, {"seed": 10**23}, {"max_tokens": "5"}, {"stream": "yes"}, {"stop": [""]},
    {"model": "a0\u0000"}, {"model": "../a0"}, {"logit_bias": {"1": 5}}, {"n": 0}, {"prompt": [10**9]},
    {"temperature": True}, {"prompt": {"nested": ["junk", 1, None]}},
]


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def soak(url: str, adapters: list[str], total: int, concurrency: int) -> dict[str, int]:
    problems = counts_problems = []
    counts = {"ok": 0, "bad_normal": 0, "hostile_5xx": 0, "hostile_4xx": 0, "hung_up": 0, "load_unload": 0}
    generator = random.Random(0)
    semaphore = asyncio.Semaphore(concurrency)
    loaded = collections.defaultdict(asyncio.Event)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> None:
            async with semaphore:
                adapter = adapters[i % len(adapters)]
                body = {"model": adapter, "prompt": f"fråga {i}", "max_tokens": 8, "temperature": 0}
                if i % 100 == 50:  # runtime load or unload
                    name = f"runtime{i // 200}"
                    if (i // 100) % 2 == 0:
                        for _ in range(100):  # 503 while every slot is held by requests in flight: retry
                            reply = await client.post("/v1/load_lora_adapter", json={"lora_name": name,
                                                                                     "lora_path": adapters[0]})
                            if reply.status_code != 503:
                                break
                            await asyncio.sleep(0.05)
                        loaded[name].set()
                    else:  # the load may still be waiting for a free slot
                        await asyncio.wait_for(loaded[name].wait(), timeout=60)
                        reply = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
                    counts["load_unload"] += reply.status_code == 200
                    if reply.status_code != 200:
                        problems.append(f"{i}: {reply.text}")
                    return
                if generator.random() < 0.05:
                    reply = await client.post("/v1/completions", json={**body, **generator.choice(HOSTILE)})
                    counts["hostile_5xx" if reply.status_code >= 500 else "hostile_4xx"] += 1
                    assert "error" in reply.json()
                    return
                if i % 37 == 0:  # a client that hangs up mid-stream
                    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                              "max_tokens": 16}) as reply:
                        async for _ in reply.aiter_lines():
                            break
                    counts["hung_up"] += 1
                    return
                reply = await client.post("/v1/completions", json=body)
                good = reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
                counts["ok" if good else "bad_normal"] += 1
                if not good:
                    problems.append(reply.text)

        await asyncio.gather(*(one(i) for i in range(total)))
    counts["problems"] = counts_problems
    return counts


def test_two_thousand_requests_with_hostile_ones_and_hang_ups(tiny_lm_dir, tmp_path):
    root = tmp_path / "adapters"
    adapters = list(save_adapters(tiny_lm_dir, root, [2, 4, 8, 6] * 4))
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=16, max_batch=32)
    server = ServerThread(create_app(engine, "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                     allow_runtime_lora=True))
    try:
        asyncio.run(soak(server.url, adapters, 200, 32))  # warm-up: every adapter loaded, buffers grown
        before = rss()
        counts = asyncio.run(soak(server.url, adapters, 2000, 32))
        after = rss()
        normal = counts["ok"] + counts["bad_normal"]
        assert counts["bad_normal"] == 0 and counts["hostile_5xx"] == 0, counts["problems"][:3]
        assert counts["ok"] + counts["hostile_4xx"] + counts["hung_up"] + 20 == 2000 and normal > 1700
        assert counts["load_unload"] == 20, counts["problems"]
        assert after <= 1.1 * before, (before, after)
        assert not engine.rows and all(e.users == 0 for e in engine.store.loaded.values())
    finally:
        server.stop()
