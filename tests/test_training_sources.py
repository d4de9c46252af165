"""The data people have: Alpaca and ShareGPT records, parquet / CSV / JSON files, saved
``datasets`` folders, column maps, each checked against the same example written in
lorakit's own shapes."""

from __future__ import annotations

import json

import pytest

from lorakit.training.data import DataError, build_dataset, check_records, load_dataset, tokenize
from lorakit.training.sources import Source, parse_columns

from test_training_data import tokenizer  # noqa: F401  (the word-level tokenizer fixture)

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": "hello"}]


def same(a, b) -> bool:
    return list(a.input_ids) == list(b.input_ids) and list(a.labels) == list(b.labels)


def test_alpaca_trains_the_tokens_of_the_same_chat(tokenizer):
    alpaca = tokenize({"instruction": "hi", "input": "there", "output": "hello", "system": "be brief"}, tokenizer)
    assert same(alpaca, tokenize({"messages": CHAT}, tokenizer))
    no_input = tokenize({"instruction": "hi", "input": "", "output": "hello"}, tokenizer)
    assert same(no_input, tokenize({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}, tokenizer))


def test_sharegpt_roles_map_to_the_chat_template_roles(tokenizer):
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi\nthere"},
             {"from": "gpt", "value": "hello"}]
    assert same(tokenize({"conversations": turns}, tokenizer), tokenize({"messages": CHAT}, tokenizer))
    with_system_key = {"system": "be brief", "conversations": turns[1:]}
    assert same(tokenize(with_system_key, tokenizer), tokenize({"messages": CHAT}, tokenizer))
    tool = tokenize({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "ok"},
                                       {"from": "gpt", "value": "bye"}]}, tokenizer)
    assert same(tool, tokenize({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "ok"},
                                             {"role": "assistant", "content": "bye"}]}, tokenizer))


@pytest.mark.parametrize("record, message", [
    ({"instruction": "hi", "output": "ok", "extra": 1}, r"unknown key\(s\) \['extra'\] in an alpaca example "
                                                        r"\(expected \['instruction', 'output'\], optionally"),
    ({"instruction": "hi"}, r'an Alpaca example needs a non-empty "instruction" and "output"'),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, r"conversations\[0\] is from 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi", "weight": 1}]}, r'conversations\[0\] must be an object '
                                                                         r'with exactly "from"'),
    ({"conversations": []}, r'"conversations" must be a non-empty list'),
])
def test_bad_alpaca_and_sharegpt_records_are_named(tmp_path, record, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: " + message):
        check_records(Source(str(path)).records(), str(path))


def test_formats_are_detected_per_line_and_counted(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    records = [{"instruction": "hi", "output": "ok"}, {"conversations": [{"from": "human", "value": "hi"},
                                                                         {"from": "gpt", "value": "ok"}]},
               {"messages": CHAT}, {"prompt": "hi", "completion": "ok"}, {"text": "a b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_dataset(path, tokenizer, max_length=64)
    assert data.formats == {"alpaca": 1, "sharegpt": 1, "messages": 1, "prompt-completion": 1, "text": 1}


ROWS = [{"question": "hi", "answer": "hello there"}, {"question": "bye", "answer": "ok"},
        {"question": "a b", "answer": "c"}]
MAPPED = [{"prompt": r["question"], "completion": r["answer"]} for r in ROWS]


def write_table(tmp_path, suffix: str):
    import pandas as pd

    frame = pd.DataFrame(ROWS + [{"question": "hi", "answer": "ok"}])
    frame["id"] = range(len(frame))  # a column nobody maps
    path = tmp_path / f"rows{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".json":  # a JSON array of objects
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    else:  # a folder written by datasets' save_to_disk, as a DatasetDict
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame),
                              "test": datasets.Dataset.from_pandas(frame.iloc[:1])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", "-saved"])
def test_tables_with_a_column_map_train_what_the_same_jsonl_trains(tmp_path, tokenizer, suffix):
    path = write_table(tmp_path, suffix)
    source = Source(str(path), columns=tuple(parse_columns("prompt=question,completion=answer").items()))
    records = list(source.records())
    assert [r for _, r in records][:3] == MAPPED
    assert records[1][0] == f"{path} row 1"
    table = build_dataset(source.records(), tokenizer, 64, source=str(path))
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MAPPED + [{"prompt": "hi", "completion": "ok"}]))
    reference = load_dataset(jsonl, tokenizer, 64)
    assert all(same(a, b) for a, b in zip(table.examples, reference.examples, strict=True))


def test_unmapped_columns_are_refused_with_file_and_row(tmp_path):
    path = write_table(tmp_path, ".parquet")
    with pytest.raises(DataError, match=r"rows\.parquet row 0: expected \"text\".*got keys \['answer', 'id', "
                                        r"'question'\].*--columns"):
        check_records(Source(str(path)).records(), str(path))
    source = Source(str(path), columns=(("prompt", "question"), ("completion", "answr")))
    with pytest.raises(DataError, match=r"rows\.parquet: no column\(s\) \['answr'\] for the column map"):
        list(source.records())


def test_a_saved_datasetdict_needs_an_existing_split(tmp_path):
    path = write_table(tmp_path, "-saved")
    columns = (("prompt", "question"), ("completion", "answer"))
    assert len(list(Source(str(path), "test", columns=columns).records())) == 1
    with pytest.raises(DataError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        list(Source(str(path), "validation", columns=columns).records())


@pytest.mark.parametrize("text, message", [
    ("prompt", "expected KEY=COLUMN"), ("prompt=a,prompt=b", "mapped twice"), ("=a", "expected KEY=COLUMN"),
])
def test_bad_column_maps_are_named(text, message):
    with pytest.raises(DataError, match=message):
        parse_columns(text)


def test_a_jsonl_line_missing_a_mapped_key_is_named(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "ok"}) + "\n" + json.dumps({"question": "hi"}) + "\n")
    source = Source(str(path), columns=(("prompt", "question"), ("completion", "answer")))
    with pytest.raises(DataError, match=r"qa\.jsonl:2: no 'answer' for the column map"):
        list(source.records())


def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(Source(str(tmp_path / "data" / "train.parquet")).records())
    with pytest.raises(DataError, match="no such file"):
        list(Source("data/train.jsonl").records())
