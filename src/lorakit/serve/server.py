"""An OpenAI-compatible HTTP server for one base model and many adapters.

    POST /v1/completions, POST /v1/chat/completions   "model" names the base or an adapter;
                                                       "stream": true answers with server-sent events
    GET  /v1/models                                    the base and every available adapter
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}   vLLM's runtime loading, off unless
    POST /v1/unload_lora_adapter {"lora_name"}                the server allows it
    GET  /health

Requests are decoded together by one Engine thread (continuous batching, mixed
adapters). An adapter is read and checked in the request's own worker thread before
it joins the batch, so a bad adapter fails only its own request. Every error is a
JSON body ``{"error": {"message", "type", "code"}}`` with a 4xx status (5xx only for
a failure inside the model), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .engine import Engine, Request, SamplingParams
from .slots import BASE
from .store import StoreError


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_queue: int = 256  # requests waiting or decoding


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    role: str
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def create_app(engine: Engine, base_name: str, limits: Limits = Limits(), allow_runtime_lora: bool = False) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = threading.Thread(target=engine.run, args=(stop,), name="lorakit-engine", daemon=True)
        worker.start()
        yield
        stop.set()
        worker.join(timeout=10)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    store = engine.store

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind)

    @app.exception_handler(StoreError)
    async def store_error(_: HttpRequest, err: StoreError) -> JSONResponse:
        kind = {404: "not_found_error", 503: "service_unavailable"}.get(err.status, "invalid_request_error")
        return _error(err.status, str(err), kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return _error(400, f"invalid request: {problems}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        entries = [{"id": base_name, "object": "model", "created": now, "owned_by": "lorakit", "root": base_name,
                    "parent": None}]
        entries += [{"id": name, "object": "model", "created": now, "owned_by": "lorakit", "root": name,
                     "parent": base_name} for name in await run_in_threadpool(store.available)]
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: give one string (batches of prompts are separate requests here)")
        ids = engine.tokenizer(prompts[0])["input_ids"]
        return await _serve(body, ids, False, http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise ApiError(400, f"{base_name} has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
        except Exception as err:  # the template rejects the conversation (roles, order, ...)
            raise ApiError(400, f"messages: the chat template cannot render them: {err}") from None
        return await _serve(body, list(ids), True, http)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadBody) -> dict[str, str]:
        _runtime_allowed()
        await run_in_threadpool(store.register, body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadBody) -> dict[str, str]:
        _runtime_allowed()
        await run_in_threadpool(store.unregister, body.lora_name)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded"}

    def _runtime_allowed() -> None:
        if not allow_runtime_lora:
            raise ApiError(403, "runtime adapter loading is off; start the server with --allow-runtime-lora")

    async def _serve(body: Sampling, ids: list[int], chat: bool, http: HttpRequest):
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{limits.max_prompt_tokens}")
        if body.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {body.max_tokens} is more than this server's limit of {limits.max_tokens}")
        if engine.waiting.qsize() + len(engine.rows) >= limits.max_queue:
            raise ApiError(429, "too many requests in flight; retry later", "rate_limit_error")
        adapter = None if body.model == base_name else body.model
        if adapter is not None and adapter not in store.loaded and adapter not in store.extra:
            store.resolve(adapter)  # 404 for an unknown name, 400 for a path that escapes the root
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed, stops)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        def on_text(text: str) -> None:  # streams only: a whole reply is read from the request at the end
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        request = Request(ids, adapter, params, on_text=on_text if body.stream else None,
                          on_done=lambda: loop.call_soon_threadsafe(pieces.put_nowait, None))
        request.slot = BASE if adapter is None else await run_in_threadpool(store.acquire, adapter)
        engine.submit(request)
        reply = Reply(body.model, chat, len(ids))
        if body.stream:
            return StreamingResponse(reply.stream(pieces, request), media_type="text/event-stream")
        await _until_done(pieces, request, http)
        if request.error is not None:
            raise ApiError(500, f"generation failed: {request.error}", "server_error")
        return reply.whole(request)

    return app


async def _until_done(pieces: asyncio.Queue, request: Request, http: HttpRequest) -> None:
    """Wait for a non-streaming request to finish; if its client hangs up first, cancel it
    (the engine drops it at the next step and frees its slot)."""
    while True:
        try:
            await asyncio.wait_for(pieces.get(), timeout=0.25)  # only the end (None) is queued
            return
        except asyncio.TimeoutError:
            if not request.cancelled and await http.is_disconnected():
                request.cancelled = True


class Reply:
    """OpenAI response bodies for one request: whole, or as server-sent event chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choice: dict[str, Any], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def _usage(self, request: Request) -> dict[str, int]:
        completion = len(request.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self, request: Request) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": request.text},
                      "finish_reason": request.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": request.text, "finish_reason": request.finish_reason, "logprobs": None}
        return {**self._envelope(choice, chunk=False), "usage": self._usage(request)}

    def _chunk(self, text: str | None, finish_reason: str | None, first: bool) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return f"data: {json.dumps(self._envelope(choice, chunk=True))}\n\n"

    async def stream(self, pieces: asyncio.Queue, request: Request):
        first = True
        try:
            while (text := await pieces.get()) is not None:
                yield self._chunk(text, None, first)
                first = False
        finally:  # the client went away mid-stream: stop decoding for it and free its slot
            if request.finish_reason is None:
                request.cancelled = True
        if request.error is not None:
            error = {"message": f"generation failed: {request.error}", "type": "server_error", "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            yield self._chunk(None, request.finish_reason, first)
        yield "data: [DONE]\n\n"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
