"""Data formats and loss masks, checked token by token on a word-level tokenizer."""

import json

import pytest

from lorakit.training.data import IGNORE, DataError, load_dataset, tokenize

WORDS = ["<unk>", "<eos>", "<user>", "<assistant>", "<system>", "<end>", "hi", "hello", "there", "bye",
         "be", "brief", "ok", "a", "b", "c"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def test_text_trains_every_token_and_ends_with_eos(tokenizer):
    example = tokenize({"text": "hi there"}, tokenizer)
    assert list(example.input_ids) == ids("hi there <eos>")
    assert list(example.labels) == list(example.input_ids)


def test_prompt_completion_masks_the_prompt(tokenizer):
    example = tokenize({"prompt": "hi", "completion": "hello there"}, tokenizer)
    assert list(example.input_ids) == ids("hi hello there <eos>")
    assert list(example.labels) == [IGNORE] + ids("hello there <eos>")
    unmasked = tokenize({"prompt": "hi", "completion": "hello there"}, tokenizer, mask_prompt=False)
    assert list(unmasked.labels) == list(unmasked.input_ids)


def test_chat_trains_only_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ok bye"}]
    example = tokenize({"messages": messages}, tokenizer)
    assert list(example.input_ids) == ids("<system> be brief <end> <user> hi <end> <assistant> hello <end> "
                                    "<user> bye <end> <assistant> ok bye <end>")
    m = IGNORE
    assert list(example.labels) == [m, m, m, m, m, m, m, m] + ids("hello <end>") + [m, m, m, m] + ids("ok bye <end>")


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_dataset_counts_formats_and_truncation(tmp_path, tokenizer):
    path = write(tmp_path, [{"text": "a b c a b c"}, "", {"prompt": "hi", "completion": "ok"},
                            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}])
    data = load_dataset(path, tokenizer, max_length=6)
    assert data.formats == {"text": 1, "prompt-completion": 1, "messages": 1}
    assert data.truncated == 1  # "a b c a b c <eos>" is 7 tokens
    assert [len(e.input_ids) for e in data.examples] == [6, 3, 6]
    assert list(data.examples[0].input_ids) == ids("a b c a b c")
    assert list(data.examples[2].labels) == [IGNORE] * 4 + ids("ok <end>")
    assert data.tokens == 15


@pytest.mark.parametrize("lines, message", [
    ([{"text": "hi"}, "{not json"], r"data\.jsonl:2: invalid JSON: Expecting property name enclosed in double "
                                    r"quotes at column 2$"),
    ([{"text": "hi"}, '{"text": "open'], r"data\.jsonl:2: invalid JSON: Unterminated string starting at column 10$"),
    ([{"prompt": "a", "completion": "b", "extra": 1}],
     r"data\.jsonl:1: unknown key\(s\) \['extra'\] in a prompt-completion example"),
    ([{"text": "hi", "source": "web"}], r"data\.jsonl:1: unknown key\(s\) \['source'\] in a text example"),
    ([{"messages": [{"role": "user", "content": "hi"}], "id": 7}], r"data\.jsonl:1: unknown key\(s\) \['id'\]"),
    ([{"messages": [{"role": "user", "content": "hi", "contnet": "x"}]}],
     r"data\.jsonl:1: messages\[0\] has unknown key\(s\) \['contnet'\]"),
    ([{"prompt": "a", "completion": ""}], r"data\.jsonl:1: \"completion\" must not be empty"),
    ([{"text": ""}], r"data\.jsonl:1: \"text\" must be a non-empty string"),
    ([["a list"]], r"data\.jsonl:1: expected a JSON object, got list"),
    ([{"txt": "hi"}], r"data\.jsonl:1: expected \"text\", \"prompt\" \+ \"completion\", \"messages\", Alpaca's \"instruction\" \+ \"output\" or ShareGPT's \"conversations\", got keys \['txt'\]"),
    ([{"text": 3}], r"data\.jsonl:1: \"text\" must be a non-empty string"),
    ([{"prompt": "hi"}], r"data\.jsonl:1: \"prompt\" and \"completion\" must both be strings \(bad 'completion'\)"),
    ([{"messages": []}], r"data\.jsonl:1: \"messages\" must be a non-empty list"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], r"data\.jsonl:1: messages\[0\] has role 'robot'"),
    ([{"messages": [{"role": "user"}]}], r"data\.jsonl:1: messages\[0\] must be an object with a string \"content\""),
    ([{"text": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}], r"data\.jsonl:2: no trainable token"),
    ([{"prompt": "a b c a b c", "completion": "ok"}], r"data\.jsonl:1: no trainable token within max_length=4"),
    (["", "  "], r"data\.jsonl: no examples \(the file is empty\)"),
])
def test_malformed_input_names_file_and_line(tmp_path, tokenizer, lines, message):
    with pytest.raises(DataError, match=message):
        load_dataset(write(tmp_path, lines), tokenizer, max_length=4)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "none.jsonl", tokenizer, max_length=8)


def test_chatterbot_corpus_gives_alternating_chat_records():
    from lorakit.training.corpus import conversations, languages
    from lorakit.training.data import example_format

    assert {"swedish", "spanish", "english"} <= set(languages())
    records = conversations("swedish")
    assert len(records) > 30
    assert all(example_format(r) == "messages" for r in records)
    first = records[0]["messages"]
    assert [m["role"] for m in first[:2]] == ["user", "assistant"]
    assert all(m["content"] for r in records for m in r["messages"])
    with pytest.raises(DataError, match="no language 'klingon'"):
        conversations("klingon")


def test_chat_trains_the_end_of_turn_token_but_not_the_template_text_after_it():
    """ChatML writes a newline after <|im_end|>; generation stops at <|im_end|>, so the
    newline is template, not something the model should learn to produce."""
    from conftest import corpus_tokenizer

    tok = corpus_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    end, newline = tok.convert_tokens_to_ids("<|end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Hej"}, {"role": "assistant", "content": "Hej!"},
                {"role": "user", "content": "Tack"}, {"role": "assistant", "content": "Varsågod"}]
    example = tokenize({"messages": messages}, tok)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    answers = [tok(m["content"], add_special_tokens=False)["input_ids"] + [end] for m in messages[1::2]]
    assert trained == answers[0] + answers[1]
    assert list(example.input_ids[-len(newline):]) == newline and example.labels[-1] == IGNORE
