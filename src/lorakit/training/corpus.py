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


def preference_pairs(language: str) -> list[dict[str, Any]]:
    """Preference pairs from the dialogs of ``language``: the question, its own answer
    (chosen) and the answer of a dialog from another topic file (rejected), so a model
    learns to answer the question it was asked."""
    import yaml

    folder = corpus_root() / language
    if not folder.is_dir():
        raise DataError(f"chatterbot-corpus has no language {language!r}; it has {', '.join(languages())}")
    firsts = []  # (topic, question, answer)
    for topic, path in enumerate(sorted(folder.glob("*.yml"))):
        for dialog in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations", []):
            turns = [str(turn).strip() for turn in dialog if turn is not None and str(turn).strip()]
            if len(turns) >= 2:
                firsts.append((topic, turns[0], turns[1]))
    pairs = []
    for i, (topic, question, answer) in enumerate(firsts):
        # the first dialog half-way round the list that is from another topic
        other = next((firsts[(i + len(firsts) // 2 + k) % len(firsts)] for k in range(len(firsts))
                      if firsts[(i + len(firsts) // 2 + k) % len(firsts)][0] != topic), None)
        if other is None:
            break
        pairs.append({"prompt": [{"role": "user", "content": question}],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": other[2]}]})
    return pairs
