"""Hugging Face Hub ids for models and adapters: ``org/name`` or ``org/name@revision``.

An id is resolved to a snapshot folder by ``huggingface_hub`` itself, so its cache
(``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` mean what they
mean everywhere else. A local path always wins over an id of the same spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What a model load reads from a snapshot: configs, safetensors weights, tokenizer files and
# chat templates. Pickled weights (*.bin, *.pt) are never fetched, since they are never loaded.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
CONFIG_FILES = ("config.json",)
ADAPTER_FILES = ("*.json", "*.safetensors")
PIPELINE_CONFIGS = ("*.json",)  # converting an image adapter reads the pipeline's configs only
# A dataset repository's data files and the README whose YAML header names its configs and splits.
DATASET_FILES = ("*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv", "*.txt", "README.md")

ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names the id and what to do."""


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse(spec: str) -> HubId | None:
    """The Hub id ``spec`` spells, or None for a local path (existing or not an id)."""
    match = ID.match(str(spec))
    if match is None or Path(spec).exists():
        return None
    return HubId(match["repo"], match["revision"])


def short_name(spec: str | Path) -> str:
    """What a source is called when nobody named it: a Hub id's repository name (no
    organisation, no revision), or a path's last part."""
    hub_id = parse(str(spec))
    return hub_id.repo.rsplit("/", 1)[-1] if hub_id else Path(str(spec).rstrip("/")).name


def split_revision(name: str | None) -> tuple[str | None, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``), as an adapter file records its base
    (PEFT's ``base_model_name_or_path`` and ``revision``); anything else is left whole."""
    match = ID.match(name or "")
    if match is None or match["revision"] is None:
        return name, None
    return match["repo"], match["revision"]


def snapshot(hub_id: HubId, patterns: tuple[str, ...], what: str = "model") -> Path:
    """The local snapshot folder of ``hub_id`` holding the files that match ``patterns``:
    from the cache when it has them, downloaded otherwise (unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(hub_id.repo, revision=hub_id.revision, allow_patterns=list(patterns),
                                      repo_type="dataset" if what == "dataset" else None))
    except GatedRepoError:
        raise HubError(f"{what} {hub_id} is gated on the Hugging Face Hub: accept its terms on its page and set "
                       "HF_TOKEN to a token of that account") from None
    except RevisionNotFoundError:
        raise HubError(f"{what} {hub_id}: the repository has no revision {hub_id.revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what} {hub_id}: no such repository on the Hugging Face Hub (a private one needs "
                       "HF_TOKEN), and no such local path") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        fetch = (f"hf download {hub_id.repo}" + (" --repo-type dataset" if what == "dataset" else "")
                 + (f" --revision {hub_id.revision}" if hub_id.revision else ""))
        raise HubError(f"{what} {hub_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                       f"run `{fetch}` where the network is reachable (into the same HF_HOME), "
                       "or give a local directory") from None


def local(spec: str | Path, patterns: tuple[str, ...], what: str = "model") -> Path:
    """``spec`` as a local path: itself, or the snapshot of the Hub id it spells."""
    hub_id = parse(str(spec))
    return Path(spec) if hub_id is None else snapshot(hub_id, patterns, what)
