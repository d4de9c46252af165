"""Training examples from JSONL, tokenized with a loss mask.

One example per line, in any of the shapes people already have:

- ``{"text": ...}``: every token is trained;
- ``{"prompt": ..., "completion": ...}``: only the completion (and EOS) is trained;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  tokenizer's chat template; only assistant turns are trained.

Masked positions get label -100, the value PyTorch's cross-entropy ignores. With
``mask_prompt=False`` every token is trained. Examples longer than ``max_length``
are truncated and counted. Every problem is reported with its file and line before
any training starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training file or example cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss is masked

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


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; malformed lines raise DataError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def example_format(record: dict[str, Any]) -> str:
    """Which of the three shapes a record has; raises DataError (without location) otherwise."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError('"messages" must be a non-empty list')
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f'messages[{i}] must be an object with a string "content"')
            if message.get("role") not in ROLES:
                raise DataError(f'messages[{i}] has role {message.get("role")!r}, expected one of {ROLES}')
        return "messages"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f'"prompt" and "completion" must both be strings (bad {key!r})')
        return "prompt-completion"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError('"text" must be a string')
        return "text"
    raise DataError(f'expected "text", "prompt" + "completion" or "messages", got keys {sorted(record)}')


def tokenize(record: dict[str, Any], tokenizer, mask_prompt: bool = True) -> Example:
    """Token ids and labels for one record."""
    return _tokenize(record, example_format(record), tokenizer, mask_prompt)


def _tokenize(record: dict[str, Any], kind: str, tokenizer, mask_prompt: bool) -> Example:
    if kind == "messages":
        ids, trained = _chat(record["messages"], tokenizer)
    elif kind == "prompt-completion":
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        ids, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        ids = tokenizer(record["text"])["input_ids"] + _eos(tokenizer)
        trained = [True] * len(ids)
    labels = [t if (keep or not mask_prompt) else IGNORE for t, keep in zip(ids, trained)]
    return Example(list(ids), labels)


def load_dataset(path: str | os.PathLike, tokenizer, max_length: int, mask_prompt: bool = True) -> Dataset:
    """Read, check and tokenize a JSONL file; every example must keep a trained token."""
    return build_dataset([(f"{path}:{n}", r) for n, r in read_jsonl(path)], tokenizer, max_length,
                         mask_prompt, source=str(path))


def build_dataset(records: list[tuple[str, dict[str, Any]]], tokenizer, max_length: int, mask_prompt: bool = True,
                  source: str = "records") -> Dataset:
    """Tokenize (location, record) pairs; errors are prefixed with the record's location."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    dataset = Dataset(examples=[], source=source)
    for where, record in records:
        try:
            kind = example_format(record)
            example = _tokenize(record, kind, tokenizer, mask_prompt)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
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
    prompt before it to the end of the render that includes it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat examples need a tokenizer with a chat template")
    ids = _render(tokenizer, messages)
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto:
            raise DataError("the chat template renders a conversation differently from its prefix, so "
                            "assistant tokens cannot be located; train without prompt masking")
        trained[start:len(upto)] = [True] * (len(upto) - start)
    return ids, trained
