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

import torch
from torch import Tensor, nn

from .forward import CachedForward
from .kvcache import KVCache
from .request import Request, SamplingParams, choose_tokens, sampled_logprobs, token_logprobs
from .slots import router_of, routing
from .store import AdapterStore, Lease, StoreError

__all__ = ["Engine", "Request", "SamplingParams", "build_engine", "complete", "lease_all"]


class Engine:
    def __init__(self, model: nn.Module, tokenizer, store: AdapterStore | None, max_batch: int = 32) -> None:
        """``store``: the adapters served by slot (None: the model runs with the adapters it has
        attached, as a training run's rollouts do)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.router = router_of(model)  # the route's context: the engine's, not an attribute of the model
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.cached_forward = CachedForward.build(model)  # None: decode through the model's generic forward
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.admitting: list[Request] = []  # taken off the queue, not yet running
        self.rows: list[Request] = []
        self.cache: KVCache | None = None  # the running rows' keys and values, per layer
        self.mask: Tensor | None = None  # (B, L): 1 for real tokens
        self.wake = threading.Event()
        self.tokens_generated = 0  # over the engine's life, for metrics
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) - {None}

    # -- called from any thread ------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request``; its adapter must already be leased (``request.lease``)."""
        self.waiting.put(request)
        self.wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.rows) or not self.waiting.empty()

    def has_room(self, limit: int, more: int = 1) -> bool:
        """Whether ``more`` requests fit under ``limit`` requests waiting or decoding."""
        return self.waiting.qsize() + len(self.admitting) + len(self.rows) + more <= limit

    # -- the decoding thread ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then decode one token for every running row."""
        while len(self.rows) + len(self.admitting) < self.max_batch:
            try:
                self.admitting.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        live = []
        for request in self.admitting:  # one look at each flag: another thread may set it meanwhile
            if request.cancelled:  # its client left while it waited: no prefill for it
                request.close("cancelled")
            else:
                live.append(request)
        self.admitting = live
        try:
            plain = [r for r in self.admitting if not r.params.prompt_logprobs]
            if plain:
                self._prefill_isolated(plain)
            for request in self.admitting:  # scoring a prompt needs every position's logits: one at a time
                if request.params.prompt_logprobs:
                    self._prefill_isolated([request])
        finally:
            self.admitting = []
        if self.rows:
            self._decode_isolated()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set: step while there is work, sleep otherwise. On stop,
        every request still waiting or decoding is answered (closed as cancelled)."""
        while not stop.is_set():
            if not self.busy:
                self.wake.wait(timeout=0.1)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception as err:  # a broken batch fails its requests, never the server
                self._fail_all(err)
        self._fail_all(None)

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to completion in this thread (for the CLI and Python API)."""
        for request in requests:
            self.submit(request)
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    # -- failure isolation -----------------------------------------------------------
    def _prefill_isolated(self, requests: list[Request]) -> None:
        """Prefill ``requests`` together; if that fails, each alone, so only a request
        that fails by itself is failed."""
        try:
            logits, cache, mask = self._prefill_forward(requests)
        except Exception as err:
            if len(requests) == 1:
                requests[0].close(error=err)
                return
            for request in requests:
                self._prefill_isolated([request])
            return
        self._join(requests, cache, mask)
        self._sample(logits, requests)

    def _decode_isolated(self) -> None:
        """Decode the running batch; if that fails, find the rows that fail alone, fail
        them, and decode the others."""
        try:
            self._decode()
            return
        except Exception as err:
            error = err
        failing = [i for i in range(len(self.rows)) if not self._decodes_alone(i)]
        if not failing:  # no row fails alone: the batch as a whole is at fault
            raise error
        for i in failing:
            self.rows[i].close(error=error)
        self._drop(failing)
        if self.rows:
            self._decode()

    def _decodes_alone(self, row: int) -> bool:
        mask = torch.cat([self.mask[row:row + 1], self.mask.new_ones((1, 1))], dim=1)
        last = torch.tensor([[self.rows[row].generated[-1]]], device=self.device)
        try:  # writes only the row's next, unused column
            self._forward(last, mask, mask[:, :-1].sum(-1, keepdim=True), [self.rows[row].slot], self.cache,
                          slice(row, row + 1))
            return True
        except Exception:
            return False

    # -- internals -------------------------------------------------------------------
    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, slots: list[int], cache: KVCache | None = None,
                 rows: slice = slice(None), all_logits: bool = False) -> tuple[Tensor, KVCache]:
        """Float logits, and the cache holding every layer's keys and values: a new one for a
        prefill (no ``cache``); a decode step writes into the next column of ``cache`` (of its
        ``rows``) and returns it."""
        from transformers import DynamicCache

        with routing(self.router, slots, ids.shape[1]):
            if self.cached_forward is not None and not all_logits and self.cached_forward.fits(mask.shape[1]):
                prefill = cache is None
                if prefill:
                    cache = KVCache(self.cached_forward.buffers(ids.shape[0], ids.shape[1]), 0)
                cache.make_room()
                layers = cache.layers if rows == slice(None) else [(k[rows], v[rows]) for k, v in cache.layers]
                attend = None if bool(mask.all()) else mask  # no padding: the causal pattern alone
                logits = self.cached_forward(ids, positions, attend, layers, cache.width)[:, None]
                if prefill:
                    cache.width = ids.shape[1]
                return logits, cache
            past = cache.for_forward(rows) if cache is not None else DynamicCache()
            # The output head runs on the last position only, unless a prompt is scored.
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True, logits_to_keep=0 if all_logits else 1)
        if cache is None:
            cache = KVCache.build([(layer.keys, layer.values) for layer in out.past_key_values.layers])
        return out.logits.float(), cache

    def _prefill_forward(self, requests: list[Request]) -> tuple[Tensor, KVCache, Tensor]:
        """Logits of the last position, the new rows' cache and mask; changes nothing."""
        requests.sort(key=lambda r: r.slot)  # grouped by adapter: no per-layer gather
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scored = requests[0].params.prompt_logprobs  # then it is the only request
        logits, cache = self._forward(ids, mask, positions, [r.slot for r in requests], all_logits=scored)
        if scored:
            request = requests[0]
            top = request.params.logprobs or 0
            request.prompt_logprobs = [None] + token_logprobs(logits[0, :-1], request.prompt_ids[1:], top)
        return logits[:, -1], cache, mask

    def _join(self, requests: list[Request], cache: KVCache, mask: Tensor) -> None:
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
        self.cache = self.cache.joined(cache, index)
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])[index]
        self.rows = [rows[i] for i in order]

    def _decode(self) -> None:
        last = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): the next position of every row
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, _ = self._forward(last, mask, positions, [r.slot for r in self.rows], self.cache)
        self.mask = mask  # only once the forward pass has succeeded: the new column counts from now on
        self.cache.width += 1
        self._sample(logits[:, -1], self.rows)

    def _sample(self, logits: Tensor, rows: list[Request]) -> None:
        """Choose and record each row's next token; a row whose own sampling fails fails alone."""
        live = [i for i, r in enumerate(rows) if not r.cancelled]
        for request in rows:
            if request.cancelled:
                request.close("cancelled")
        try:
            tokens = choose_tokens(logits[live], [rows[i] for i in live])
        except Exception:  # find the row at fault
            tokens = []
            for i in live:
                try:
                    tokens.append(choose_tokens(logits[i:i + 1], [rows[i]])[0])
                except Exception as err:
                    rows[i].close(error=err)
                    tokens.append(None)
        scored = [(i, t) for i, t in zip(live, tokens) if t is not None and rows[i].params.sample_logprobs]
        if scored:
            rows_scored = [i for i, _ in scored]
            values = sampled_logprobs(logits[rows_scored], [t for _, t in scored], [rows[i] for i in rows_scored])
            for (i, _), value in zip(scored, values):
                rows[i].sampled_logprobs.append(value)
        for i, token in zip(live, tokens):
            request = rows[i]
            if token is None or request.done.is_set():
                continue
            try:
                # The end-of-sequence token is scored too: harnesses read the last entry as the generated one.
                if request.params.logprobs is not None and request.params.max_tokens:
                    request.logprobs += token_logprobs(logits[i:i + 1], [token], request.params.logprobs)
                self._append(request, token)
            except Exception as err:
                request.close(error=err)
        finished = [i for i, r in enumerate(self.rows) if r.done.is_set()]
        if finished:
            self._drop(finished)

    def _append(self, request: Request, token: int) -> None:
        params = request.params
        if params.max_tokens == 0:  # a scored prompt: nothing to generate
            request.close("length")
            return
        reason, cut = None, False
        if token in self.eos and not params.ignore_eos:
            reason, request.stop_token = "stop", token
        else:
            request.generated.append(token)
            self.tokens_generated += 1
            before = len(request.text)
            request.add_text(self.tokenizer)
            if params.stop:  # a stop string can only end in the new text or straddle its start
                start = max(0, before - max(len(s) for s in params.stop) + 1)
                at = min((i for i in (request.text.find(s, start) for s in params.stop) if i >= 0), default=-1)
                if at >= 0:
                    request.text, reason, cut = request.text[:at], "stop", True
            if reason is None and len(request.generated) >= params.max_tokens:
                reason = "length"
        if reason is not None and not cut:
            request.add_text(self.tokenizer, final=True)  # a trailing partial character, as it is
        self._emit(request, final=reason is not None)
        if reason is not None:
            request.close(reason)

    def _emit(self, request: Request, final: bool) -> None:
        """Pass new text on; until the end, hold back what may still become a stop string."""
        if request.on_text is None:
            return
        end = len(request.text)
        if not final:
            end -= max((len(s) - 1 for s in request.params.stop), default=0)
        if end > request.sent:
            request.on_text(request.text[request.sent:end])
            request.sent = end

    def _drop(self, finished: list[int]) -> None:
        gone = set(finished)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row left
        self.mask = mask[:, first:]
        self.cache = self.cache.selected(index, first)

    def _fail_all(self, error: Exception | None) -> None:
        """Close every request the engine holds or has queued: with ``error``, or as
        cancelled (None, when the server stops)."""
        failed = self.rows + self.admitting
        while not self.waiting.empty():
            failed.append(self.waiting.get_nowait())
        self.rows, self.admitting, self.cache, self.mask = [], [], None, None
        for request in failed:
            request.close("cancelled", error)


def lease_all(store: AdapterStore, names: list[str | None]) -> list[Lease | None]:
    """Leases on the slots of ``names`` (None: the base); on error, releases what it took."""
    leases: list[Lease | None] = []
    try:
        for name in names:
            leases.append(None if name is None else store.lease(name))
    except StoreError:
        for lease in leases:
            if lease is not None:
                lease.release()
        raise
    return leases


def build_engine(spec: str, adapters: str | None = None, max_adapters: int = 8, max_adapter_bytes: int | None = None,
                 max_batch: int = 32, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 quantize: str | None = None) -> Engine:
    """Load model ``spec`` for serving on ``device``: slots for ``max_adapters`` adapters from
    the root ``adapters``; ``quantize``: 'nf4' or 'int8' base weights (see lorakit.quantize)."""
    from pathlib import Path

    from ..pretrained import load_model, load_tokenizer
    from .slots import enable_slots

    if adapters is not None and not Path(adapters).is_dir():  # before the slow part
        raise StoreError(f"adapter root {adapters} is not a directory", 400)
    model = load_model(spec, dtype=dtype, quantize=quantize).to(device)  # before the slots: their pools live beside the weights
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
    ids = [encode(engine.tokenizer, text, chat) for text in prompts]
    leases = lease_all(engine.store, adapters)
    requests = [Request(p, name, params, lease=lease) for p, name, lease in zip(ids, adapters, leases)]
    return engine.generate(requests)
