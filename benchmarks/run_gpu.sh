#!/usr/bin/env bash
# The whole benchmark matrix for one model on one CUDA GPU, in one command.
#
#   benchmarks/run_gpu.sh MODEL OUTDIR        e.g. benchmarks/run_gpu.sh llama-3.1-8b "$OUT/h100"
#
# MODEL is a preset (llama-3.1-8b, qwen2.5-7b: random weights in the real shapes, bf16)
# or a local model folder. Needs torch, transformers, peft, xxhash, attrs, matplotlib,
# tqdm; installs nothing. Writes OUTDIR/<date>-<device>-<model>.{json,md} and PNGs, and
# rewrites them after every scenario, so a run cut short keeps the scenarios it finished.
#
# Budget (8B shape, bf16, H100; FACTS.md: full prefill 36-600 ms for 1K-16K, HF eager
# decode ~25-45 ms/step): most of the time is decoding, 0.8-1.4 s per 32-token request
# whatever the method. Expected total 4.5-7.5 min (low / high decode cost):
#   prefix  5 contexts x 3 methods x (1+5) requests, 32 new tokens       80-135 s
#   rag     3 K x 6 methods x (1+3) requests, 16 new tokens
#           + warm-up of the 32-document pool and 8 untimed fidelity prompts  70-110 s
#   checks  (1+5) x 3 methods x 10 checks on a 4K context                 25-35 s
#   cold    5 contexts x 2 methods x (1+3) requests, 32 new tokens        40-65 s
#   chat    2 methods x 20 turns x (1+2) passes, 8 new tokens             25-55 s
#   python/torch import, random 8B init on the GPU, floor                 ~40 s
# Scenarios run most important first; the 10-minute limit of one device command leaves
# room for the slow end.
set -euo pipefail

MODEL=${1:?usage: benchmarks/run_gpu.sh MODEL OUTDIR}
OUTDIR=${2:?usage: benchmarks/run_gpu.sh MODEL OUTDIR}
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'PY'
import torch, transformers, peft
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA'}")
PY

time python3 -m spanctx.bench prefix rag checks cold chat \
    --model "$MODEL" --device cuda --out "$OUTDIR" \
    --warmup 1 --repeats 5,rag=3,cold=3,chat=2 \
    --contexts 1024,2048,4096,8192,16384 --question-tokens 64 --new-tokens 32,rag=16,chat=8 \
    --rag-docs 4,8,16 --rag-doc-tokens 512 --rag-pool 32 --rag-system-tokens 128 --rag-fidelity-prompts 8 \
    --checks 10 --checks-context 4096 --adapter-rank 32 \
    --chat-turns 20 --chat-system-tokens 1024 --chat-user-tokens 64 --chat-reply-tokens 64
