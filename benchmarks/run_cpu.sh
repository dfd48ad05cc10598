#!/usr/bin/env bash
# The small CPU matrix whose results are committed under benchmarks/results/ (the
# notebook's default input): the tiny-llama preset (random weights, fp32), small sizes.
#
#   benchmarks/run_cpu.sh [OUTDIR]      (about a minute on an idle 2-core machine)
set -euo pipefail
OUTDIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
# One thread: on a shared machine, a descheduled second thread stalls every op, and the
# medians turn into noise.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

python3 -m spanctx.bench prefix rag chat checks cold \
    --model tiny-llama --device cpu --out "$OUTDIR" \
    --warmup 1 --repeats 3 \
    --contexts 256,512,1024,2048 --question-tokens 32 --new-tokens 8,chat=4 \
    --rag-docs 2,4,8 --rag-doc-tokens 128 --rag-pool 16 --rag-system-tokens 64 --rag-fidelity-prompts 4 \
    --checks 10 --checks-context 512 --adapter-rank 8 \
    --chat-turns 6 --chat-system-tokens 256 --chat-user-tokens 32 --chat-reply-tokens 32
