"""An OpenAI-compatible HTTP server for one base model and many adapters.

    POST /v1/completions, POST /v1/chat/completions   "model" names the base or an adapter;
                                                       "stream": true answers with server-sent events
    GET  /v1/models                                    the base and every adapter that loads
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}   vLLM's runtime loading, off unless
    POST /v1/unload_lora_adapter {"lora_name"}                the server allows it
    GET  /health, GET /metrics (Prometheus)

Failure isolation is the design: a request is checked completely (protocol.py) before
it leases an adapter slot or reaches the engine; the lease belongs to the request and
is released when the request closes, on every path; the engine answers every request
it takes and fails only a request that fails by itself. Every error is a JSON body
``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, lease_all
from .metrics import Metrics
from .protocol import MAX_PROMPTS, ChatBody, CompletionBody, LoadBody, Reply, Sampling, UnloadBody, validation_message
from .request import Request, SamplingParams
from .store import StoreError


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_queue: int = 256  # requests (choices) waiting or decoding


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Service:
    """What the handlers share: one per app."""

    engine: Engine
    base_name: str
    limits: Limits
    allow_runtime_lora: bool
    metrics: Metrics

    @property
    def store(self):
        return self.engine.store


router = APIRouter()


def create_app(engine: Engine, base_name: str, limits: Limits = Limits(), allow_runtime_lora: bool = False,
               engine_thread: bool = True) -> FastAPI:
    """The app; its engine runs in a thread of its own while the app runs, or, with
    ``engine_thread=False``, in whichever thread calls ``engine.run(app.state.stop)``
    (``serve_here``); the app's shutdown sets that event."""
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = None
        if engine_thread:
            worker = threading.Thread(target=engine.run, args=(stop,), name="lorakit-engine", daemon=True)
            worker.start()
        yield
        stop.set()  # the engine closes whatever it still holds as cancelled, then returns
        if worker is not None:
            worker.join(timeout=10)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.stop = stop
    app.state.service = Service(engine, base_name, limits, allow_runtime_lora, Metrics(engine))
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    return app


def _service(http: HttpRequest) -> Service:
    return http.app.state.service


def serve_here(app: FastAPI, config) -> bool:
    """Serve ``app`` (made with ``engine_thread=False``) until SIGINT or SIGTERM: HTTP in a
    second thread, the engine's forward passes in this one; False if the HTTP server never
    started (the port taken, say).

    The engine stays in the thread that loaded the model because the CPU's math library
    (OpenMP) runs a parallel region several times slower from a second thread once the first
    has used it: a decode step of SmolLM2-135M took 75 ms there against 45 ms here."""
    import signal

    import uvicorn

    server = uvicorn.Server(config)
    stop: threading.Event = app.state.stop

    def http() -> None:
        try:
            server.run()
        finally:  # normally the app's shutdown has set it; a failed start has not
            stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in signals}  # a first signal drains, a second forces
    thread = threading.Thread(target=http, name="lorakit-http", daemon=True)
    try:
        thread.start()
        app.state.service.engine.run(stop)
        thread.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return server.started


# -- errors: always the JSON body ---------------------------------------------------
def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


async def _api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
    return _error(err.status, err.message, err.kind)


async def _store_error(_: HttpRequest, err: StoreError) -> JSONResponse:
    kind = {404: "not_found_error", 503: "service_unavailable"}.get(err.status, "invalid_request_error")
    return _error(err.status, str(err), kind)


async def _invalid(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
    return _error(400, validation_message(err.errors()))


async def _http_error(_: HttpRequest, err: HTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404 else
                  "invalid_request_error")


async def _unexpected(_: HttpRequest, err: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(err).__name__}: {err}", "server_error")


# -- endpoints -------------------------------------------------------------------------
@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(http: HttpRequest) -> Response:
    return Response(_service(http).metrics.text(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(http: HttpRequest) -> dict[str, Any]:
    service = _service(http)
    now = int(time.time())
    entries = [{"id": service.base_name, "object": "model", "created": now, "owned_by": "lorakit",
                "root": service.base_name, "parent": None, "max_model_len": service.limits.max_prompt_tokens}]
    entries += [{"id": info.name, "object": "model", "created": now, "owned_by": "lorakit", "root": info.root,
                 "parent": service.base_name, "rank": info.rank}
                for info in await _in_own_thread(service.store.catalog)]
    return {"object": "list", "data": entries}


@router.post("/v1/completions")
async def completions(body: CompletionBody, http: HttpRequest):
    service = _service(http)
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens: 0 generates nothing; it is only allowed with echo (to score a prompt)")
    given = body.prompts()
    if len(given) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(given)}")
    prompts = [_prompt_ids(service, p, i) for i, p in enumerate(given)]
    params = _params(service, body, body.max_tokens, body.logprobs, prompt_logprobs=body.echo and
                     body.logprobs is not None)
    echo = [p if isinstance(p, str) else service.engine.tokenizer.decode(p) for p in given] if body.echo else None
    return await _serve(service, body, prompts, params, http, chat=False, echo=echo)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, http: HttpRequest):
    service = _service(http)
    tokenizer = service.engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"{service.base_name} has no chat template; use /v1/completions")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true")
    try:
        ids = tokenizer.apply_chat_template([m.for_template() for m in body.messages], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    except Exception as err:  # the template rejects the conversation (roles, order, ...)
        raise ApiError(400, f"messages: the chat template cannot render them: {err}") from None
    prompt = _prompt_ids(service, list(ids), 0)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.limits.max_tokens
    params = _params(service, body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    return await _serve(service, body, [prompt], params, http, chat=True)


@router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadBody, http: HttpRequest) -> dict[str, str]:
    service = _runtime_allowed(http)
    await _in_own_thread(service.store.register, body.lora_name, body.lora_path)
    return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadBody, http: HttpRequest) -> dict[str, str]:
    service = _runtime_allowed(http)
    await _in_own_thread(service.store.unregister, body.lora_name)
    return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded"}


def _own_thread(function, *args) -> Future:
    """``function(*args)`` in a new thread that ends with it: adapter reads and loads, which use
    the model's tensors, never run in the decoding loop nor in a pooled worker thread. A living
    thread that has once run a parallel CPU kernel keeps a pool of OpenMP threads, and while it
    lives the decoding thread's short kernels ran several times slower (GNU OpenMP: 40 against
    145 us for one of SmolLM2's products at batch 1); a thread that has ended has freed its pool."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as err:  # raised where the handler awaits it
            future.set_exception(err)

    threading.Thread(target=run, name="lorakit-adapter", daemon=True).start()
    return future


async def _in_own_thread(function, *args):
    return await asyncio.wrap_future(_own_thread(function, *args))


def _runtime_allowed(http: HttpRequest) -> Service:
    service = _service(http)
    if not service.allow_runtime_lora:
        raise ApiError(403, "runtime adapter loading is off; start the server with --allow-runtime-lora")
    return service


# -- checking a request, before it holds anything -----------------------------------------
def _prompt_ids(service: Service, prompt: str | list[int], index: int) -> list[int]:
    engine, limits = service.engine, service.limits
    ids = list(engine.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else prompt
    where = "prompt" if index == 0 else f"prompt[{index}]"
    if not ids:
        raise ApiError(400, f"{where} is empty after tokenization; give at least one token")
    if max(ids) >= engine.vocab_size:
        raise ApiError(400, f"{where}: token id {max(ids)} is outside the vocabulary (size {engine.vocab_size})")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"{where} has {len(ids)} tokens, more than this server's limit of "
                            f"{limits.max_prompt_tokens}")
    return ids


def _params(service: Service, body: Sampling, max_tokens: int, logprobs: int | None,
            prompt_logprobs: bool = False) -> SamplingParams:
    if max_tokens > service.limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is more than this server's limit of "
                            f"{service.limits.max_tokens}")
    if body.stream and logprobs is not None:
        raise ApiError(400, "logprobs: not available with stream; ask without streaming")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only with stream: true")
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.stops, logprobs,
                          prompt_logprobs, body.frequency_penalty, body.presence_penalty, body.ignore_eos)


# -- serving: lease, submit, answer ---------------------------------------------------------
async def _serve(service: Service, body: Sampling, prompts: list[list[int]], params: SamplingParams,
                 http: HttpRequest, chat: bool, echo: list[str] | None = None):
    engine, store = service.engine, service.store
    count = len(prompts) * body.n
    if not engine.has_room(service.limits.max_queue, count):
        raise ApiError(429, "too many requests in flight; retry later", "rate_limit_error")
    adapter = None if body.model == service.base_name else body.model
    if adapter is not None and not store.knows(adapter):
        await _in_own_thread(store.resolve, adapter)  # 404 unknown, 400 escapes the root
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    requests = []
    for index in range(count):
        seeded = params if params.seed is None else _with_seed(params, index % body.n)
        on_text = (lambda text, i=index: loop.call_soon_threadsafe(pieces.put_nowait, (i, text))) \
            if body.stream else None

        def on_done(request: Request, i: int = index) -> None:
            service.metrics.observe(request)
            loop.call_soon_threadsafe(pieces.put_nowait, (i, None))

        requests.append(Request(prompts[index // body.n], adapter, seeded, on_text=on_text, on_done=on_done))
    leases = await _lease(store, [adapter] * count)
    submitted = 0
    try:
        for request, lease in zip(requests, leases):
            request.lease = lease
        for request in requests:
            engine.submit(request)
            submitted += 1
    finally:
        for request in requests[submitted:]:  # never reached the engine: close here, releasing the lease
            request.close("cancelled")
    reply = Reply(body.model, chat, engine.tokenizer)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(reply, pieces, requests, include_usage), media_type="text/event-stream")
    try:
        await _until_done(pieces, requests, http)
    finally:
        for request in requests:
            if not request.done.is_set():
                request.cancelled = True
    failed = next((r.error for r in requests if r.error is not None), None)
    if failed is not None:
        raise ApiError(500, f"generation failed: {failed}", "server_error")
    return reply.whole(requests, [echo[i // body.n] for i in range(count)] if echo else None)


async def _lease(store, names: list[str | None]) -> list:
    """Leases on ``names``: here when every adapter is loaded already, else in a thread of their
    own (``_own_thread``); if this handler is cancelled meanwhile, the leases are released when
    they arrive rather than lost."""
    held = [None if name is None else store.lease_loaded(name) for name in names]
    if all(lease is not None or name is None for lease, name in zip(held, names)):
        return held
    for lease in held:
        if lease is not None:
            lease.release()
    work = asyncio.wrap_future(_own_thread(lease_all, store, names))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        def release(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                for lease in done.result():
                    if lease is not None:
                        lease.release()
        work.add_done_callback(release)
        raise


def _with_seed(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice j of a seeded request samples with seed + j, so n choices differ and repeat."""
    seed = params.seed + choice
    return replace(params, seed=seed if seed < 2**64 else seed - 2**64)


async def _until_done(pieces: asyncio.Queue, requests: list[Request], http: HttpRequest) -> None:
    """Wait for every choice to finish; if the client hangs up first, cancel them (the
    engine drops them at its next step and frees their slots). The hang-up is awaited as
    an event, not polled, so waiting requests cost the event loop nothing."""
    async def hung_up() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for request in requests:
            request.cancelled = True

    watcher = asyncio.create_task(hung_up())
    try:
        remaining = len(requests)
        while remaining:
            _, text = await pieces.get()
            remaining -= text is None
    finally:
        watcher.cancel()


async def _stream(reply: Reply, pieces: asyncio.Queue, requests: list[Request], include_usage: bool):
    started, remaining = set(), len(requests)
    try:
        while remaining:
            index, text = await pieces.get()
            request = requests[index]
            if text is not None:
                yield _event(reply.chunk(index, text, None, index not in started))
            elif request.error is None:
                remaining -= 1
                yield _event(reply.chunk(index, None, request.finish_reason, index not in started))
            else:
                remaining -= 1
                yield _event({"error": {"message": f"generation failed: {request.error}", "type": "server_error",
                                        "code": 500}})
            started.add(index)
        if include_usage:
            yield _event(reply.usage_chunk(requests))
        yield "data: [DONE]\n\n"
    finally:  # the client went away mid-stream: stop decoding for it and free its slots
        for request in requests:
            if not request.done.is_set():
                request.cancelled = True


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
