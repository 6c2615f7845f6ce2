#!/usr/bin/env python3
"""Training throughput of a config: tokens/s, TFLOP/s per GPU, MFU, peak memory and the
split of step time into attention / MoE dispatch / data / other.

    python tools/benchmark_train.py examples/configs/bench_transfusion_1b.yaml \
        --steps 20 --warmup 5 --out benchmarks/results/train_1b_bf16_sdpa.json
    torchrun --nproc_per_node 8 tools/benchmark_train.py CONFIG --set parallel.tp=2 --out bench.json

The same program is `megafusion bench` (megafusion/bench.py); benchmarks/run_train_bench_gpu.sh
lists the measurement matrix.
"""

import sys

from megafusion.bench import main

if __name__ == "__main__":
    sys.exit(main())
