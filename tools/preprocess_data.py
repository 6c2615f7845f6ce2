#!/usr/bin/env python3
"""Preprocess JSONL corpora into megatron-core indexed datasets (+ a visual store).

Megatron-style flags; examples:

    # text: one dataset per JSON key, OUT_text_document.{bin,idx}
    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/web \
        --tokenizer-model tok.model --json-keys text --append-eod --workers 8

    # any sentencepiece model (e.g. Llama-2's), or a local Hugging Face tokenizer directory; the special
    # tokens it lacks are appended after its vocabulary (OUT_text_document.tokenizer_map.json says how)
    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/web --append-eod \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model my_tokenizer/

    # image-text pairs {"image": "img/001.png", "text": "a red circle"} with raw pixel patches
    python tools/preprocess_data.py --input pairs.jsonl --output-prefix out/pairs \
        --tokenizer-model tok.model --kind image-text --encoder pixel --image-size 64 --patch-size 8

    # videos {"video": "v.webm", "text": ...} or {"frames": [...]}; action videos add
    # "actions" (one per transition) and "context_frames"
    python tools/preprocess_data.py --input clips.jsonl --output-prefix out/clips \
        --tokenizer-model tok.model --kind video --max-frames 16 --fps 4

    # webdataset-style tars (KEY.jpg + KEY.txt) or a folder of the same, one shard per tar
    python tools/preprocess_data.py --input shards/*.tar --output-prefix out/wds \
        --tokenizer-model tok.model --kind image-text

The same program is `megafusion preprocess-data` (`megafusion.data.preprocess.main`); `--help`
lists every flag with its default. Output is sharded under OUT.shards/
while it runs; re-running the same command resumes (finished shards are kept). Re-runs are
content-addressed: a shard is made again only when the bytes of its input lines, of the
images/videos they name, of the tokenizer model or of the encoder's files (or a flag) changed;
if nothing changed the run says "nothing to do". Bad items are skipped and listed
(OUT.errors.jsonl) unless --strict. Errors (a bad tokenizer or output prefix, a bad item
under --strict) are one line on stderr and exit status 2. See megafusion/data/preprocess/
(its __init__ lists the modules: readers, documents, encoders, digests, shards, run, cli)
and megafusion/data/indexed.py for the format.
"""

import sys

from megafusion.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
