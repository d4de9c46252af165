"""Batched generation across adapters, with a KV cache and continuous batching.

The engine keeps one running batch. Each ``step``:

1. admits waiting requests (up to ``max_batch`` rows): their prompts are prefilled
   together, left-padded, and their caches are joined to the running batch's (the
   shorter side is left-padded in the sequence dimension, masked out);
2. decodes one token for every running row, each row on its own adapter slot (rows
   are kept grouped by slot, so each layer adds each adapter's update to a contiguous
   block of rows);
3. samples per row (greedy, or temperature / top-p with the request's own seeded
   generator), checks EOS, ``max_tokens`` and stop strings, and drops finished rows.

So requests that arrive while others decode join at the next step. Everything runs
in the thread that calls ``step``; other threads only ``submit``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .slots import BASE, routing
from .store import AdapterStore, StoreError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Request:
    """One prompt to complete. ``on_text`` (optional) receives text as it is generated."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[], None] | None = None  # called once, when finished (or failed)
    slot: int = BASE  # set by whoever acquired the adapter from the store (acquire_all)
    # filled in by the engine
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already passed to on_text
    finish_reason: str | None = None
    cancelled: bool = False  # set by another thread (a client went away): dropped at the next step
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer, store: AdapterStore, max_batch: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.rows: list[Request] = []
        self.cache: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values): (B, H, L, D)
        self.mask: Tensor | None = None  # (B, L): 1 for real tokens
        self.wake = threading.Event()
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) - {None}

    # -- called from any thread ------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request``; its adapter must already be acquired (``request.slot``)."""
        if request.params.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.params.seed)
        self.waiting.put(request)
        self.wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.rows) or not self.waiting.empty()

    # -- the decoding thread ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then decode one token for every running row."""
        admitted = []
        while len(self.rows) + len(admitted) < self.max_batch:
            try:
                admitted.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        if admitted:
            self._prefill(admitted)
        if self.rows:
            self._decode()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set: step while there is work, sleep otherwise."""
        while not stop.is_set():
            if not self.busy:
                self.wake.wait(timeout=0.1)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception as err:  # a broken batch fails its requests, never the server
                self._fail_all(err)

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to completion in this thread (for the CLI and Python API)."""
        for request in requests:
            self.submit(request)
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    # -- internals -------------------------------------------------------------------
    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, slots: list[int],
                 cache: list[tuple[Tensor, Tensor]] | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        from transformers import DynamicCache

        past = DynamicCache(cache) if cache is not None else DynamicCache()
        with routing(self.model, slots, ids.shape[1]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True, logits_to_keep=1)  # the output head on the last position only
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1].float(), layers

    def _prefill(self, requests: list[Request]) -> None:
        requests = sorted(requests, key=lambda r: r.slot)  # grouped by adapter: no per-layer gather
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, [r.slot for r in requests], None)
        self._join(requests, cache, mask)
        self._sample(logits, requests)

    def _join(self, requests: list[Request], cache: list[tuple[Tensor, Tensor]], mask: Tensor) -> None:
        """Append new rows (their cache and mask) to the running batch, left-padding the shorter side."""
        if self.cache is None:
            self.rows, self.cache, self.mask = list(requests), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: Tensor, dim: int) -> Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        rows = self.rows + requests
        # Keep the rows grouped by adapter, so every layer's segments are contiguous views.
        order = sorted(range(len(rows)), key=lambda i: rows[i].slot)
        index = torch.tensor(order, device=self.device)
        self.cache = [(torch.cat([pad(k0, 2), pad(k1, 2)])[index], torch.cat([pad(v0, 2), pad(v1, 2)])[index])
                      for (k0, v0), (k1, v1) in zip(self.cache, cache)]
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])[index]
        self.rows = [rows[i] for i in order]

    def _decode(self) -> None:
        last = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): the next position of every row
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache = self._forward(last, self.mask, positions, [r.slot for r in self.rows], self.cache)
        self._sample(logits, self.rows)

    def _sample(self, logits: Tensor, rows: list[Request]) -> None:
        greedy = logits.argmax(-1).tolist()
        for row, request in enumerate(rows):
            params = request.params
            if request.cancelled:
                request.finish_reason = "cancelled"
                self._emit(request)
                continue
            if params.temperature > 0:
                token = _sample_top_p(logits[row] / params.temperature, params.top_p, request.generator)
            else:
                token = greedy[row]
            self._append(request, token)
        finished = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        if finished:
            self._drop(finished)

    def _append(self, request: Request, token: int) -> None:
        params = request.params
        if token in self.eos:
            request.finish_reason = "stop"
        else:
            request.generated.append(token)
            request.text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            cut = min((i for i in (request.text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                request.text = request.text[:cut]
                request.finish_reason = "stop"
            elif len(request.generated) >= params.max_tokens:
                request.finish_reason = "length"
        self._emit(request)

    def _emit(self, request: Request) -> None:
        """Pass new text on; hold back what may still become a stop string or a partial character."""
        if request.on_text is not None:
            end = len(request.text)
            if request.finish_reason is None:
                end -= max((len(s) - 1 for s in request.params.stop), default=0)
                while end > request.sent and request.text[end - 1] == "\ufffd":
                    end -= 1
            if end > request.sent:
                request.on_text(request.text[request.sent:end])
                request.sent = end
        if request.finish_reason is not None:
            self._finish(request)

    def _finish(self, request: Request) -> None:
        if request.adapter is not None:
            self.store.release(request.adapter)
        request.done.set()
        if request.on_done is not None:
            request.on_done()

    def _drop(self, finished: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(finished)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row left
        self.mask = mask[:, first:]
        self.cache = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                      for k, v in self.cache]

    def _fail_all(self, error: Exception) -> None:
        failed = list(self.rows)
        while not self.waiting.empty():
            failed.append(self.waiting.get_nowait())
        self.rows, self.cache, self.mask = [], None, None
        for request in failed:
            request.error, request.finish_reason = error, "error"
            self._finish(request)


def _sample_top_p(logits: Tensor, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def acquire_all(store: AdapterStore, names: list[str | None]) -> list[int]:
    """Slots for ``names`` (None: the base); on error, releases what it took and re-raises."""
    taken: list[str] = []
    slots = []
    try:
        for name in names:
            slots.append(BASE if name is None else store.acquire(name))
            if name is not None:
                taken.append(name)
    except StoreError:
        for name in taken:
            store.release(name)
        raise
    return slots


def build_engine(spec: str, adapters: str | None = None, max_adapters: int = 8, max_adapter_bytes: int | None = None,
                 max_batch: int = 32, dtype: torch.dtype = torch.float32) -> Engine:
    """Load model ``spec`` for serving: slots for ``max_adapters`` adapters from the root ``adapters``."""
    from ..pretrained import load_model, load_tokenizer
    from .slots import enable_slots

    model = load_model(spec, dtype=dtype)
    tokenizer = load_tokenizer(spec)
    enable_slots(model, max_adapters)
    return Engine(model, tokenizer, AdapterStore(model, adapters, max_adapters, max_adapter_bytes), max_batch)


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt, rendered as one user turn with the chat template when ``chat``."""
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
        return list(rendered["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def complete(engine: Engine, prompts: list[str], adapters: list[str | None], params: SamplingParams = SamplingParams(),
             chat: bool = True) -> list[Request]:
    """Complete every prompt with its adapter (None: the base) in one batch; chat prompts go
    through the tokenizer's chat template when it has one."""
    chat = chat and getattr(engine.tokenizer, "chat_template", None) is not None
    requests = [Request(encode(engine.tokenizer, text, chat), name, params) for text, name in zip(prompts, adapters)]
    for request, slot in zip(requests, acquire_all(engine.store, adapters)):
        request.slot = slot
    return engine.generate(requests)
