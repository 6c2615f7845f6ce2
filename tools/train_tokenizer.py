#!/usr/bin/env python3
"""Train a megafusion sentencepiece tokenizer (BPE or unigram) from text files.

The model reserves megafusion's special tokens (<pad>, <boi>, <eoi>, <frame>) and any
action tokens given with --actions, e.g.

    python tools/train_tokenizer.py --input corpus/*.txt --model-prefix out/tok \
        --vocab-size 32000 --model-type bpe --actions W,A,S,D

writes out/tok.model (load it with megafusion.data.tokenizer.Tokenizer) and out/tok.vocab.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.data.tokenizer import Tokenizer, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="plain-text files, one sentence or paragraph per line")
    p.add_argument("--model-prefix", required=True, help="output path prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--actions", default="", help="comma-separated action names to reserve as <act_NAME> tokens")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled from the input for training (bounds memory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    actions = [a for a in args.actions.split(",") if a]
    path = train_tokenizer(args.input, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                           actions=actions, character_coverage=args.character_coverage,
                           input_sentence_size=args.input_sentence_size)
    tok = Tokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, pad={tok.pad_id} boi={tok.boi_id} eoi={tok.eoi_id} "
          f"frame={tok.frame_id} eod={tok.eod_id}, actions={tok.action_ids()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
