"""Reward functions for GRPO, with TRL's signature:

    reward(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion (None: this function does not score it). ``prompts`` and
``completions`` are strings, or message lists for conversational prompts (a completion is
then ``[{"role": "assistant", "content": ...}]``); every other column of the data comes
as a keyword argument, one value per completion.

A reward is named on the command line as ``path/to/file.py:function``,
``package.module:function``, or one of the built-ins:

    match:COLUMN             1 if the completion equals the column's value (stripped), else 0
    normalized_match:COLUMN  the same after case folding, dropping punctuation and spaces
    format:REGEX             1 if the whole completion (stripped) matches REGEX, else 0
    length:TOKENS            0 up to TOKENS completion tokens, then -(excess / TOKENS)
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError

BUILT_IN = ("match", "normalized_match", "format", "length")


@dataclass(frozen=True)
class Reward:
    name: str  # the metric name: rewards/<name>/mean
    function: Callable[..., list[float | None]]
    column: str | None = None  # the data column a built-in reads


def load_reward(spec: str) -> Reward:
    """The reward ``spec`` names; ConfigError (one line) when it cannot be had."""
    kind, sep, argument = spec.partition(":")
    if not sep or not kind or not argument:
        raise ConfigError(f"--reward {spec!r}: expected path/to/file.py:function, module:function or a built-in "
                          f"({', '.join(f'{b}:...' for b in BUILT_IN)})")
    if kind in BUILT_IN:
        return _built_in(kind, argument, spec)
    if kind.endswith(".py"):
        module = _from_file(Path(kind), spec)
    else:
        try:
            module = importlib.import_module(kind)
        except Exception as err:
            raise ConfigError(f"--reward {spec!r}: module {kind!r} does not import: {type(err).__name__}: {err}") \
                from None
    function = getattr(module, argument, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec!r}: {kind} has no function {argument!r}")
    return Reward(argument, function)


def _from_file(path: Path, spec: str):
    if not path.is_file():
        raise ConfigError(f"--reward {spec!r}: no such file {path}")
    name = f"lorakit_reward_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    try:
        sys.modules[name] = module
        loader.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ConfigError(f"--reward {spec!r}: {path} does not import: {type(err).__name__}: {err}") from None
    return module


def _built_in(kind: str, argument: str, spec: str) -> Reward:
    if kind == "format":
        try:
            pattern = re.compile(argument, re.DOTALL)
        except re.error as err:
            raise ConfigError(f"--reward {spec!r}: not a regular expression: {err}") from None
        return Reward("format", lambda completions, **_: [float(pattern.fullmatch(text_of(c).strip()) is not None)
                                                          for c in completions])
    if kind == "length":
        if not argument.isdigit() or int(argument) < 1:
            raise ConfigError(f"--reward {spec!r}: length takes a number of tokens >= 1")
        limit = int(argument)
        return Reward("length", lambda completion_ids, **_: [-max(0, len(ids) - limit) / limit
                                                             for ids in completion_ids])
    normal = normalized if kind == "normalized_match" else str.strip

    def match(completions, **columns: Any) -> list[float]:
        return [float(normal(text_of(c)) == normal(str(v))) for c, v in zip(completions, columns[argument])]

    return Reward(kind, match, column=argument)


def text_of(completion: str | list[dict[str, str]]) -> str:
    """A completion's text (a conversational completion is one assistant message)."""
    return completion if isinstance(completion, str) else "".join(m.get("content", "") for m in completion)


PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalized(text: str) -> str:
    return " ".join(text.casefold().translate(PUNCTUATION).split())


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], prompt_index: list[int]) -> list[list[float]]:
    """rewards[k](...) for every completion: (completions x rewards), None as NaN. A function
    that raises or answers with the wrong length raises RewardError naming it and the prompt."""
    table = []
    named = ", ".join(str(i) for i in dict.fromkeys(prompt_index))
    for reward in rewards:
        try:
            values = list(reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                          **columns))
        except Exception as err:
            raise RewardError(f"reward {reward.name} raised {type(err).__name__}: {err} (scoring the completions of "
                              f"prompt {named})") from err
        if len(values) != len(completions):
            raise RewardError(f"reward {reward.name} returned {len(values)} values for {len(completions)} "
                              f"completions (of prompt {named}): one value per completion is expected")
        for i, value in enumerate(values):
            if value is not None and not isinstance(value, (int, float)):
                raise RewardError(f"reward {reward.name} returned {value!r} for a completion of prompt "
                                  f"{prompt_index[i]}: expected a number or None")
        table.append([float("nan") if v is None else float(v) for v in values])
    return [list(row) for row in zip(*table)]


class RewardError(ValueError):
    """A reward function failed; the message names it and the prompt."""
