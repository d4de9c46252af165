"""Real conversations for the default training run, from the PyPI package
``chatterbot-corpus`` (BSD-licensed Q/A dialogs in about 20 languages).

Each dialog in the package's YAML files is a list of turns; turns alternate user,
assistant, user, ... and become one ``{"messages": [...]}`` record.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .data import DataError


def corpus_root() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default training data needs the package chatterbot-corpus: pip install chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def languages() -> list[str]:
    return sorted(p.name for p in corpus_root().iterdir() if p.is_dir() and any(p.glob("*.yml")))


def conversations(language: str) -> list[dict[str, Any]]:
    """Every dialog of ``language`` with at least one answer, as chat records, in file order."""
    import yaml

    folder = corpus_root() / language
    if not folder.is_dir():
        raise DataError(f"chatterbot-corpus has no language {language!r}; it has {', '.join(languages())}")
    records = []
    for path in sorted(folder.glob("*.yml")):
        for dialog in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations", []):
            turns = [str(turn).strip() for turn in dialog if turn is not None and str(turn).strip()]
            if len(turns) < 2:
                continue
            roles = ["user", "assistant"] * len(turns)
            records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return records
