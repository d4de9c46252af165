#!/usr/bin/env bash
# The GPU figures in one call, on a CUDA host with no network: the image's torch, transformers
# and peft; torchao and bitsandbytes carried as wheels in .gpu/whl; SmolLM2's tokenizer and a
# JSONL of long texts in .gpu, made by bench/gpu_prepare.sh. Results go to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, torchao, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, torchao.__version__, bitsandbytes.__version__)" 2>&1 | grep -v "Failed to load" | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/bench_combine.py --device cuda --rounds 5 2>&1 | grep -v "Failed to load\|warn" | tee "$OUT/combine.txt"
timeout 420 python3 bench/bench_gpu_train.py --tokenizer .gpu/smollm2-config --data .gpu/text.jsonl --work /tmp/models \
    --steps 16 --results "$OUT/train.jsonl" 2>&1 | grep -v "Failed to load" | tee "$OUT/train.txt"
