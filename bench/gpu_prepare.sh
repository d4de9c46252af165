#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what bench/gpu_round.sh needs on a GPU host without network:
# SmolLM2's tokenizer, 256 long texts from chatterbot-corpus (every row is cut at 512 tokens),
# and the torchao and bitsandbytes wheels for that host's Python 3.12.
set -eu
python=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/whl .gpu/smollm2-config
$python -c "import lorakit; lorakit.load_tokenizer('smollm2-135m').save_pretrained('.gpu/smollm2-config')"
$python - <<'PY'
import json
from lorakit.training.corpus import conversations, languages
texts = [" ".join(m["content"] for m in r["messages"]) for lang in languages() for r in conversations(lang)]
lines, current, i = [], "", 0
while len(lines) < 256:
    current += texts[i % len(texts)] + "\n"
    i += 1
    if len(current) > 4000:
        lines.append(json.dumps({"text": current}))
        current = ""
open(".gpu/text.jsonl", "w").write("\n".join(lines) + "\n")
PY
$python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl torchao==0.18.0 bitsandbytes==0.50.2
