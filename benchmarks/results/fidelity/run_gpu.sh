#!/usr/bin/env bash
# The one GPU call behind this folder's figures (issue 22): train tiny-trained, evaluate it on
# the held-out set, install it in this tree, then run the fidelity matrix in three processes
# at once (K = 16 with all 16 worlds; K = 2, 4, 8 and K = 32 with 4 worlds each).
#   OUT=DIR bash benchmarks/results/fidelity/run_gpu.sh        (from the repository root)
# Writes DIR/tiny-trained/ (weights, config, training.json, training-log.txt) and
# DIR/fidelity-k16.json, DIR/fidelity-k2-8.json, DIR/fidelity-k32.json. TRAIN, BENCH, WORLDS16,
# WORLDS, SPLITS, SPLIT_LIMIT override the settings (a CPU smoke test uses them); TRAIN=none skips the training.
set -u -o pipefail
: "${OUT:?set OUT to the output folder}"
TRAIN=${TRAIN:---compile}  # train_tiny.py's defaults are the shipped recipe
BENCH=${BENCH:-}
WORLDS16=${WORLDS16:-16}
WORLDS=${WORLDS:-4}
SPLIT_LIMIT=${SPLIT_LIMIT:-210}  # seconds per fidelity process: the call must end inside its 10 minutes
METHODS=full,naive-concat,parallel:none,parallel:head:4,parallel:head:16,parallel:head:32,parallel:blend:0.15
METHODS=$METHODS,parallel:head:8+blend:0.05,parallel-root:none
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "$TRAIN" != none ]; then  # TRAIN=none: the fidelity matrix of the preset in this tree, no training
    python benchmarks/train_tiny.py --out "$OUT" $TRAIN || exit 1
    cp "$OUT"/tiny-trained/{model.safetensors,config.json,training.json,training-log.txt} spanctx/weights/tiny-trained/
fi
SPLITS=${SPLITS:-16:$WORLDS16:k16 2,4,8:$WORLDS:k2-8 32:$WORLDS:k32}  # one process each: Ks:worlds:name
for split in $SPLITS; do
    set -- ${split//:/ }
    (timeout "$SPLIT_LIMIT" python -m spanctx.bench fidelity --model tiny-trained --executor eager --no-progress \
        --methods "$METHODS" --fidelity-docs "$1" --fidelity-worlds "$2" --out "/tmp/fidelity-$3" $BENCH \
        > "/tmp/fidelity-$3.log" 2>&1
     echo "fidelity $3: exit $?"; cp /tmp/fidelity-"$3"/*.json "$OUT/fidelity-$3.json") &
done
wait
for log in /tmp/fidelity-k*.log; do echo "== $log"; tail -n 25 "$log"; done
