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
            # Some of json's messages end in "... starting at"; the column completes them.
            where = f"column {err.colno}" if err.msg.endswith(" at") else f"at column {err.colno}"
            raise DataError(f"{path}:{number}: invalid JSON: {err.msg} {where}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


SHAPES = {"messages": {"messages"}, "prompt-completion": {"prompt", "completion"}, "text": {"text"}}
MESSAGE_KEYS = {"role", "content"}


def read_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) for every example of a JSONL file, each line's JSON and shape checked.

    Cheap (no model, no tokenizer), so a run reports a bad file at once; what needs
    the tokenizer (an example with no trained token left) is checked when tokenizing.
    """
    records = []
    for number, record in read_jsonl(path):
        try:
            example_format(record)
        except DataError as err:
            raise DataError(f"{path}:{number}: {err}") from None
        records.append((f"{path}:{number}", record))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def example_format(record: dict[str, Any]) -> str:
    """Which of the three shapes a record has; raises DataError (without location) otherwise.

    A key outside the record's shape is an error rather than ignored: a typo such as
    ``"completon"`` would otherwise train on the wrong tokens without a word.
    """
    kind = ("messages" if "messages" in record else
            "prompt-completion" if "prompt" in record or "completion" in record else
            "text" if "text" in record else None)
    if kind is None:
        raise DataError(f'expected "text", "prompt" + "completion" or "messages", got keys {sorted(record)}')
    unknown = sorted(set(record) - SHAPES[kind])
    if unknown:
        raise DataError(f"unknown key(s) {unknown} in a {kind} example (expected exactly {sorted(SHAPES[kind])})")
    if kind == "messages":
        _check_messages(record["messages"])
    elif kind == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f'"prompt" and "completion" must both be strings (bad {key!r})')
        if not record["completion"]:
            raise DataError('"completion" must not be empty')
    elif not isinstance(record["text"], str) or not record["text"]:
        raise DataError('"text" must be a non-empty string')
    return kind


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
    return build_dataset(read_records(path), tokenizer, max_length, mask_prompt, source=str(path))


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
