"""Shared set-up for the serving tests: a tiny model directory, adapters of mixed ranks
saved under one root, and a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
from conftest import randomize_adapters

import lorakit


def save_adapters(model_dir: Path, root: Path, ranks: list[int], scale: float = 0.3,
                  targets: str | tuple[str, ...] = "all-linear") -> dict[str, int]:
    """Adapters a0, a1, ... with the given ranks (alpha = 2 rank, random A and B) under ``root``."""
    names = {}
    for i, rank in enumerate(ranks):
        model = lorakit.load_model(str(model_dir))
        lorakit.attach(model, lorakit.LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
        randomize_adapters(model, seed=100 + i, scale=scale)
        lorakit.save_adapter(model, root / f"a{i}")
        names[f"a{i}"] = rank
    return names


def alone(model_dir: Path, adapter: Path | None):
    """The model with just this adapter (or none), as lorakit's LoRA layers compute it."""
    model = lorakit.load_model(str(model_dir))
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    return model.eval()


def greedy_alone(model_dir: Path, adapter: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model = alone(model_dir, adapter)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 until ``stop``."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
