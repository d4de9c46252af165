"""The OpenAI request and response bodies lorakit serves, checked strictly.

Every field has its type and range: no string-to-number coercion (``"5"`` is not 5,
``true`` is not 1), no infinities, and a field lorakit does not implement is a 400
naming it rather than silently ignored. A request is checked completely here, before
it holds an adapter slot or reaches the engine.

Completions follow OpenAI's legacy API as vLLM serves it (``prompt`` as text, token
ids, or a list of either; ``echo`` and ``logprobs`` for scoring, as evaluation
harnesses use them); chat follows the chat completions API (``logprobs`` /
``top_logprobs``, ``max_completion_tokens``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .request import MAX_LOGPROBS, Request, TokenLogprob

MAX_CHOICES = 16  # n
MAX_PROMPTS = 64  # prompts in one completions request
SEED = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generators accept


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = SEED
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes
    user: str | None = None  # an end-user id for the caller's records; not used

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionBody(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class LoadBody(Strict):
    lora_name: str
    lora_path: str


class UnloadBody(Strict):
    lora_name: str


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One line naming every bad field, from pydantic's errors (first alternative of a union)."""
    seen, parts = set(), []
    for error in errors:
        where = [str(p) for p in error["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in
                                                            ("str", "int", "list", "function-after")))]
        field = ".".join(where) or "body"
        if field in seen:
            continue
        seen.add(field)
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unsupported field (lorakit does not implement it)")
        else:
            parts.append(f"{field}: {error['msg']}")
    return "invalid request: " + "; ".join(parts)


class Reply:
    """OpenAI response bodies for one HTTP request of one or more choices."""

    def __init__(self, model: str, chat: bool, tokenizer) -> None:
        self.model, self.chat, self.tokenizer = model, chat, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def usage(requests: list[Request]) -> dict[str, int]:
        # n choices of one prompt share it: the prompt is counted once per distinct prompt
        prompt = sum(len(r.prompt_ids) for r in {id(r.prompt_ids): r for r in requests}.values())
        completion = sum(len(r.generated) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, requests: list[Request], echo: list[str] | None = None) -> dict[str, Any]:
        choices = []
        for index, request in enumerate(requests):
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": request.text},
                                "finish_reason": request.finish_reason, "logprobs": self._chat_logprobs(request)})
            else:
                prefix = echo[index] if echo else ""
                choices.append({"index": index, "text": prefix + request.text, "finish_reason": request.finish_reason,
                                "logprobs": self._completion_logprobs(request, bool(echo))})
        return {**self._envelope(choices, chunk=False), "usage": self.usage(requests)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, requests: list[Request]) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": self.usage(requests)}

    # -- logprobs ------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _completion_logprobs(self, request: Request, echo: bool) -> dict[str, Any] | None:
        if request.params.logprobs is None:
            return None
        scored: list[TokenLogprob | None] = (list(request.prompt_logprobs) if echo else []) + request.logprobs
        tokens = (request.prompt_ids if echo else []) + [t.token for t in request.logprobs]
        pieces = [self._piece(t) for t in tokens]
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return {"tokens": pieces,
                "token_logprobs": [None if s is None else s.logprob for s in scored],
                "top_logprobs": [None if s is None else self._top(s) for s in scored],
                "text_offset": offsets}

    def _top(self, scored: TokenLogprob) -> dict[str, float]:
        """Alternatives keyed by their text, as OpenAI's format has it; of tokens that read
        alike (partial UTF-8 bytes), the most likely one keeps the key."""
        top: dict[str, float] = {}
        for token, value in scored.top:
            top.setdefault(self._piece(token), value)
        return top

    def _chat_logprobs(self, request: Request) -> dict[str, Any] | None:
        if request.params.logprobs is None:
            return None

        def entry(token: int, value: float) -> dict[str, Any]:
            piece = self._piece(token)
            return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

        scored = request.logprobs[:len(request.generated)]  # not the end-of-sequence token: not content
        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top]}
                            for s in scored]}
