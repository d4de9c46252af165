"""Where training records come from, one dict per example, each with its location.

- JSONL files (``.jsonl``, or any suffix not listed below) are read line by line here,
  so a bad line is named by file, line and column;
- parquet, CSV and JSON files, folders written by ``Dataset.save_to_disk`` and Hub
  dataset ids (``org/name``) are read by the ``datasets`` library: memory-mapped Arrow
  tables, iterated in batches, so a million rows are never a million dicts at once.

A source is read twice (checked before the tokenizer and model load, then tokenized),
and never held whole. A column map (``prompt=question,completion=answer``) builds each
record from the named columns alone; without one every key must belong to the record's
shape (training/data.py), so a misspelt key is an error rather than ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import hub

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json"}
ROWS_PER_BATCH = 1024


class DataError(ValueError):
    """A training file or example cannot be used; the message names the file and line."""


def parse_columns(text: str | None) -> dict[str, str]:
    """``prompt=question,completion=answer`` -> {record key: column}."""
    if not text:
        return {}
    columns = {}
    for item in text.split(","):
        key, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not key or not column:
            raise DataError(f"columns: expected KEY=COLUMN[,KEY=COLUMN...], got {item.strip()!r} in {text!r}")
        if key in columns:
            raise DataError(f"columns: {key!r} is mapped twice in {text!r}")
        columns[key] = column
    return columns


@dataclass(frozen=True)
class Source:
    """Training data: a path or a Hub dataset id, with the split and config a Hub id or a
    saved ``DatasetDict`` needs, and an optional column map."""

    spec: str
    split: str = "train"
    config: str | None = None
    columns: tuple[tuple[str, str], ...] = ()

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(location, record) for every example, in order."""
        path = Path(self.spec)
        if not path.exists() and (path.suffix in (*TABLE_SUFFIXES, ".jsonl") or hub.parse(self.spec) is None):
            raise DataError(f"{self.spec}: no such file")
        yield from self._mapped(_jsonl(path) if path.is_file() and path.suffix not in TABLE_SUFFIXES
                                else self._rows())

    def _rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(``spec row N``, row) for every row of the table, read a batch of columns at a time."""
        table = self._table()
        if self.columns:
            missing = sorted({column for _, column in self.columns} - set(table.column_names))
            if missing:
                raise DataError(f"{self.spec}: no column(s) {missing} for the column map; it has {table.column_names}")
        for start in range(0, len(table), ROWS_PER_BATCH):
            batch = table[start:start + ROWS_PER_BATCH]  # columns of plain values
            names = list(batch)
            for offset, values in enumerate(zip(*(batch[name] for name in names))):
                row = {name: _without_nulls(value) for name, value in zip(names, values) if value is not None}
                yield f"{self.spec} row {start + offset}", row

    def _mapped(self, records) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.columns:
            yield from records
            return
        for where, record in records:
            missing = sorted(column for _, column in self.columns if column not in record)
            if missing:
                raise DataError(f"{where}: no {', '.join(map(repr, missing))} for the column map "
                                f"(keys {sorted(record)})")
            yield where, {key: record[column] for key, column in self.columns}

    def _table(self):
        """The split as a ``datasets.Dataset`` (memory-mapped; nothing is materialised)."""
        import datasets

        from ..quiet import no_progress_bars

        path = Path(self.spec)
        with no_progress_bars():
            try:
                if path.is_dir():
                    loaded = datasets.load_from_disk(str(path))
                elif path.is_file():
                    loaded = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
                else:  # through huggingface_hub's cache, which (unlike datasets' own) also serves offline
                    folder = hub.snapshot(hub.parse(self.spec), hub.DATASET_FILES, "dataset")
                    loaded = datasets.load_dataset(str(folder), self.config, split=self.split)
            except hub.HubError as err:
                raise DataError(str(err)) from None
            except Exception as err:  # datasets' own errors share no base class; keep its one-line reason
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise DataError(f"{self.spec}: cannot be read as a dataset: {reason}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise DataError(f"{self.spec}: no split {self.split!r}; it has {sorted(loaded)}")
            loaded = loaded[self.split]
        return loaded


def _without_nulls(value: Any) -> Any:
    """Arrow gives every row every column and every struct every field, with None where a
    row has none: drop them, so a row reads like the JSON object it came from."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``path:line``, object) for every non-blank line; a malformed line raises DataError."""
    with path.open(encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:{number}", _object(line.rstrip("\r\n"), f"{path}:{number}")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _object(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        # Some of json's messages end in "... starting at"; the column completes them.
        column = f"column {err.colno}" if err.msg.endswith(" at") else f"at column {err.colno}"
        raise DataError(f"{where}: invalid JSON: {err.msg} {column}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record
