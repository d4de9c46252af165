"""Training examples, tokenized with a loss mask.

One record per example (from training/sources.py: JSONL, parquet, CSV, JSON, saved
``datasets`` folders, Hub datasets), in any of the shapes people already have, told
apart record by record:

- ``{"text": ...}``: every token is trained;
- ``{"prompt": ..., "completion": ...}``: only the completion (and EOS) is trained;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  tokenizer's chat template; only assistant turns are trained;
- Alpaca, ``{"instruction", "input", "output", "system"}``: the chat
  [system], user ``instruction`` + newline + ``input``, assistant ``output``
  (LLaMA-Factory's reading);
- ShareGPT, ``{"conversations": [{"from": ..., "value": ...}, ...], "system"}``: a chat
  with ``from`` human/user, gpt/assistant/model, system, tool mapped to its roles.

Alpaca and ShareGPT records become chats, so their trained tokens are exactly those of
the same example written as ``messages``.

Masked positions get label -100, the value PyTorch's cross-entropy ignores. With
``mask_prompt=False`` every token is trained. Examples longer than ``max_length``
are truncated and counted. Every problem is reported with its file and line before
any training starts.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from .sources import DataError, Source

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Example:
    # array("i") when tokenized here: 4 bytes a token, not a Python int each (a million
    # examples stay hundreds of MB); any sequence of ints works.
    input_ids: Sequence[int]
    labels: Sequence[int]  # IGNORE where the loss is masked

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss predicts: trained labels after the first (nothing predicts token 0)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class Dataset:
    examples: list[Example]
    source: str
    truncated: int = 0  # examples cut to max_length
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


SHAPES = {"messages": {"messages"}, "sharegpt": {"conversations", "system"},
          "alpaca": {"instruction", "input", "output", "system"}, "prompt-completion": {"prompt", "completion"},
          "text": {"text"}}
OPTIONAL = {"system", "input"}
CHATS = ("messages", "sharegpt", "alpaca")
MESSAGE_KEYS = {"role", "content"}
# ShareGPT's speakers, as axolotl and LLaMA-Factory read them.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "observation": "tool"}


def example_format(record: dict[str, Any]) -> str:
    """Which shape a record has; raises DataError (without location) otherwise.

    A key outside the record's shape is an error rather than ignored: a typo such as
    ``"completon"`` would otherwise train on the wrong tokens without a word.
    """
    kind = ("messages" if "messages" in record else
            "sharegpt" if "conversations" in record else
            "alpaca" if "instruction" in record or "output" in record else
            "prompt-completion" if "prompt" in record or "completion" in record else
            "text" if "text" in record else None)
    if kind is None:
        raise DataError('expected "text", "prompt" + "completion", "messages", Alpaca\'s "instruction" + "output" '
                        f'or ShareGPT\'s "conversations", got keys {sorted(record)} (map other columns with '
                        '--columns, e.g. prompt=question,completion=answer)')
    unknown = sorted(set(record) - SHAPES[kind])
    if unknown:
        optional = sorted(SHAPES[kind] & OPTIONAL)
        expected = (f"{sorted(SHAPES[kind] - OPTIONAL)}, optionally {optional}" if optional
                    else f"exactly {sorted(SHAPES[kind])}")
        article = "an" if kind[0] in "aeiou" else "a"
        raise DataError(f"unknown key(s) {unknown} in {article} {kind} example (expected {expected})")
    if kind in CHATS:
        _check_messages(chat_messages(record, kind))
    elif kind == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f'"prompt" and "completion" must both be strings (bad {key!r})')
        if not record["completion"]:
            raise DataError('"completion" must not be empty')
    elif not isinstance(record["text"], str) or not record["text"]:
        raise DataError('"text" must be a non-empty string')
    return kind


def chat_messages(record: dict[str, Any], kind: str) -> list[dict[str, str]]:
    """The chat a messages, Alpaca or ShareGPT record stands for."""
    if kind == "messages":
        return record["messages"]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError('"system" must be a string')
    head = [{"role": "system", "content": system}] if system else []
    if kind == "alpaca":
        for key in ("instruction", "output", "input"):
            if not isinstance(record.get(key, ""), str):
                raise DataError(f'"{key}" must be a string')
        if not record.get("instruction") or not record.get("output"):
            raise DataError('an Alpaca example needs a non-empty "instruction" and "output"')
        user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError('"conversations" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"} or not isinstance(turn["value"], str):
            raise DataError(f'conversations[{i}] must be an object with exactly "from" and a string "value"')
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f'conversations[{i}] is from {turn["from"]!r}, expected one of {sorted(SHAREGPT_ROLES)}')
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return head + messages


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'messages[{i}] must be an object with a string "content"')
        if message.get("role") not in ROLES:
            raise DataError(f'messages[{i}] has role {message.get("role")!r}, expected one of {ROLES}')
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise DataError(f"messages[{i}] has unknown key(s) {unknown} (expected {sorted(MESSAGE_KEYS)})")


def tokenize(record: dict[str, Any], tokenizer, mask_prompt: bool = True) -> Example:
    """Token ids and labels for one record."""
    return _tokenize(record, example_format(record), tokenizer, mask_prompt)


def _tokenize(record: dict[str, Any], kind: str, tokenizer, mask_prompt: bool,
              encoded: tuple[list[int], ...] | None = None) -> Example:
    """``encoded``: the record's strings already tokenized (a batch call, see ``_encode``)."""
    if kind in CHATS:
        ids, trained = _chat(chat_messages(record, kind), tokenizer)
    else:
        encoded = encoded or _encode(tokenizer, [(record, kind)])[0]
        if kind == "prompt-completion":
            prompt, completion = encoded[0], encoded[1] + _eos(tokenizer)
            ids, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        else:
            ids = encoded[0] + _eos(tokenizer)
            trained = [True] * len(ids)
    labels = [t if (keep or not mask_prompt) else IGNORE for t, keep in zip(ids, trained)]
    return Example(array("i", ids), array("i", labels))


def _encode(tokenizer, items: list[tuple[dict[str, Any], str]]) -> list[tuple[list[int], ...]]:
    """The token ids of each text or prompt-completion record's strings, in two tokenizer
    calls for the whole list instead of two per record (chat records get empty tuples)."""
    wanted = [(record, kind) for record, kind in items if kind not in CHATS]
    firsts = [r["text"] if k == "text" else r["prompt"] for r, k in wanted]
    completions = [r["completion"] for r, k in wanted if k == "prompt-completion"]
    first_ids = iter(tokenizer(firsts)["input_ids"] if firsts else [])
    completion_ids = iter(tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else [])
    return [() if kind in CHATS else (next(first_ids),) if kind == "text" else (next(first_ids), next(completion_ids))
            for _, kind in items]


def load_dataset(path: str | os.PathLike, tokenizer, max_length: int, mask_prompt: bool = True) -> Dataset:
    """Read, check and tokenize a data file (any format training/sources.py reads)."""
    return build_dataset(Source(str(path)).records(), tokenizer, max_length, mask_prompt, source=str(path))


def check_records(records: Iterable[tuple[str, dict[str, Any]]], source: str,
                  shape=example_format) -> dict[str, int]:
    """Every record's shape checked by ``shape`` (no tokenizer, no model: cheap, so a bad
    file is reported at once); the number of records of each shape."""
    formats: dict[str, int] = {}
    for where, record in records:
        kind = _located(where, shape, record)
        formats[kind] = formats.get(kind, 0) + 1
    if not formats:
        raise DataError(f"{source}: no examples (the file is empty)")
    return formats


def _located(where: str, function, *args):
    try:
        return function(*args)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


BATCH = 1024  # records tokenized together


def build_dataset(records: Iterable[tuple[str, dict[str, Any]]], tokenizer, max_length: int,
                  mask_prompt: bool = True, source: str = "records") -> Dataset:
    """Tokenize (location, record) pairs as they come; errors are prefixed with the
    record's location."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    dataset = Dataset(examples=[], source=source)
    records = iter(records)
    while chunk := list(islice(records, BATCH)):
        kinds = [_located(where, example_format, record) for where, record in chunk]
        encoded = _encode(tokenizer, [(record, kind) for (_, record), kind in zip(chunk, kinds)])
        for (where, record), kind, strings in zip(chunk, kinds, encoded):
            example = _located(where, _tokenize, record, kind, tokenizer, mask_prompt, strings)
            cut = len(example.input_ids) > max_length
            if cut:
                example = Example(example.input_ids[:max_length], example.labels[:max_length])
                dataset.truncated += 1
            if example.trained_tokens == 0:
                raise DataError(f"{where}: no trainable token" + (f" within max_length={max_length}" if cut else "")
                                + " (a chat needs an assistant turn; a completion must not be empty)")
            dataset.examples.append(example)
            dataset.formats[kind] = dataset.formats.get(kind, 0) + 1
    if not dataset.examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return dataset


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            return_dict=True)
    return list(encoded["input_ids"])


def _chat(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[bool]]:
    """Render the whole chat; an assistant turn spans from the end of the generation
    prompt before it through its end-of-turn token.

    What a template writes after the end-of-turn token (ChatML's newline after
    ``<|im_end|>``) is not trained: generation stops at that token, so the model never
    produces what follows it. TRL's ``{% generation %}`` templates draw the same line.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat examples need a tokenizer with a chat template")
    ids = _render(tokenizer, messages)
    trained = [False] * len(ids)
    special = _special_ids(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto:
            raise DataError("the chat template renders a conversation differently from its prefix, so "
                            "assistant tokens cannot be located; train without prompt masking")
        end = _end_of_turn(upto, start, special, tokenizer)
        trained[start:end] = [True] * (end - start)
    return ids, trained


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def _end_of_turn(ids: list[int], start: int, special: set[int], tokenizer) -> int:
    """One past the turn's last special token, if only whitespace follows it; else the end."""
    last = max((p for p in range(start + 1, len(ids)) if ids[p] in special), default=None)
    if last is None or tokenizer.decode(ids[last + 1:]).strip():
        return len(ids)
    return last + 1
