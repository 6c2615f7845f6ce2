#!/usr/bin/env python3
"""Train an RAE's ViT decoder on frozen encoder features: the same program as
``megafusion train-decoder`` (see ``megafusion.vision.train_decoder``), e.g.

    torchrun --nproc_per_node 8 tools/train_rae_decoder.py --encoder-path /weights/siglip2 --data /data/images \
        --run-dir runs/rae --image-size 256
"""

import sys

from megafusion.vision.train_decoder import main

if __name__ == "__main__":
    sys.exit(main())
