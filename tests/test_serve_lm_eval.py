"""A real evaluation client: EleutherAI's lm-evaluation-harness runs against
``lorakit serve`` (``local-completions``) and against its own ``hf`` backend (PEFT
loading the same adapter) on two small local tasks, a log-likelihood one and a
generate_until one. Every per-document answer must agree."""

import json
import random

import pytest
from serving import ServerThread, save_adapters

from lorakit.serve.engine import build_engine
from lorakit.serve.server import Limits, create_app

lm_eval = pytest.importorskip("lm_eval")

TASKS = {
    "lorakit_sv_choice": """
task: lorakit_sv_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Fråga: {{{{question}}}}\\nSvar:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "lorakit_sv_answer": """
task: lorakit_sv_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Fråga: {{{{question}}}}\\nSvar:"
doc_to_target: "{{{{reply}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two task configs over 8 Swedish chatterbot-corpus exchanges, written as local JSONL."""
    from lorakit.training.corpus import conversations

    folder = tmp_path_factory.mktemp("tasks")
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in conversations("swedish")[:8]]
    generator = random.Random(0)
    with open(folder / "data.jsonl", "w") as handle:
        for i, (question, reply) in enumerate(pairs):
            others = [pairs[(i + k) % len(pairs)][1] for k in (1, 2, 3)]
            choices = [reply, *others]
            generator.shuffle(choices)
            handle.write(json.dumps({"question": question, "reply": reply, "choices": [" " + c for c in choices],
                                     "answer": choices.index(reply)}) + "\n")
    for name, text in TASKS.items():
        (folder / f"{name}.yaml").write_text(text.format(data=folder / "data.jsonl"))
    return folder


def per_document(results, task):
    return [sample["filtered_resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_through_the_server_equals_its_hf_backend(tiny_lm_dir, tmp_path, tasks, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path / "adapters"
    save_adapters(tiny_lm_dir, root, [4, 8])
    engine = build_engine(str(tiny_lm_dir), str(root), max_adapters=2)
    server = ServerThread(create_app(engine, "tiny", Limits(max_prompt_tokens=2048, max_tokens=256)))
    names = sorted(TASKS)
    try:
        for adapter in ("a0", "a1"):
            served = lm_eval.simple_evaluate(
                model="local-completions", tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                model_args={"model": adapter, "base_url": server.url + "/v1/completions",
                            "tokenizer": str(tiny_lm_dir), "tokenizer_backend": "huggingface",
                            "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True},
                log_samples=True)
            reference = lm_eval.simple_evaluate(
                model="hf", tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                model_args={"pretrained": str(tiny_lm_dir), "peft": str(root / adapter), "dtype": "float32",
                            "device": "cpu"}, log_samples=True)
            ours, theirs = per_document(served, "lorakit_sv_choice"), per_document(reference, "lorakit_sv_choice")
            assert len(ours) == 8
            for mine, other in zip(ours, theirs):
                assert [loglikelihood for loglikelihood, _ in mine] == pytest.approx(
                    [loglikelihood for loglikelihood, _ in other], abs=1e-4)
            assert per_document(served, "lorakit_sv_answer") == per_document(reference, "lorakit_sv_answer")
            for task in names:
                assert served["results"][task] == reference["results"][task], (adapter, task)
    finally:
        server.stop()
