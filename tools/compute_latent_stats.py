#!/usr/bin/env python3
"""Compute per-channel latent statistics of a visual representation over a dataset and store
them with it. See ``megafusion.vision.stats.main`` for the flags, e.g.

    python tools/compute_latent_stats.py --path runs/rae/representation --data /data/images --num-images 50000
    torchrun --nproc_per_node 8 tools/compute_latent_stats.py --kind vae --path /weights/sd-vae --data ... --out DIR
"""

import sys

from megafusion.vision.stats import main

if __name__ == "__main__":
    sys.exit(main())
