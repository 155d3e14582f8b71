#!/usr/bin/env bash
# The checks that need a GPU, as one short script (run it on a machine with CUDA, from the
# repository root, with the virtual environment of `make venv`): the CUDA tests (random-number
# replay under GradCache, fp16 with a GradScaler, the lab on CUDA with every precision), then the
# GPU memory of the cache and the trainer's images/s on a CIFAR-sized ResNet-18 with a 2-epoch run;
# then sampled K against all on CUDA (Floyd's draw there is K steps of small kernels); last, the
# symmetric losses' pair of directions against the directions one by one on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -15
BENCH_DATA=cifar BENCH_DEVICE=cuda BENCH_CIFAR_N=${BENCH_CIFAR_N:-50000} BENCH_CIFAR_BATCH=${BENCH_CIFAR_BATCH:-512} \
    "$PY" bench/bench_trainer.py 1 3
"$PY" bench/bench_gradcache.py --device cuda --models mlp transformer 2>&1 | tail -25
"$PY" bench/bench_losses.py --device cuda --sizes 512 2048 8192 --ks 16 64 128 --repeats 7 2>&1 | tail -30
"$PY" bench/bench_symmetric.py --device cuda --sizes 1024 4096 16384 --repeats 7 2>&1 | tail -16
