#!/usr/bin/env python3
"""Train a megafusion sentencepiece tokenizer (BPE or unigram) from text files.

The model reserves megafusion's special tokens (<pad>, <boi>, <eoi>, <frame>) and any
action tokens given with --actions, e.g.

    python tools/train_tokenizer.py --input corpus/*.txt --model-prefix out/tok \
        --vocab-size 32000 --model-type bpe --actions W,A,S,D

writes out/tok.model (load it with megafusion.data.tokenizer.Tokenizer) and out/tok.vocab.
"""

import sys

from megafusion.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
