"""Raw corpora -> indexed datasets (the logic and CLI behind ``tools/preprocess_data.py`` and
``megafusion preprocess-data``).

Input: JSONL files, one item per line; for image-text also webdataset-style ``.tar`` files
and folders (``KEY.jpg`` + ``KEY.txt``), for video folders (``KEY.mp4`` [+ ``KEY.txt``]).
Kinds: ``text`` (one dataset per JSON key, ``<prefix>_<key>_document`` as Megatron's tool
names them), ``image-text``, ``video`` and ``action-video`` (one dataset at ``<prefix>``, see
``megafusion.data.indexed``); the item fields and document token streams of each are in
``documents.py``.

The input is cut into shards of ``shard_size`` lines by byte offset (never read whole;
a tar is one shard, a folder is cut by sample keys);
workers tokenize/encode a shard each and write it under ``<prefix>.shards/`` to temporary
names, renamed when complete, with a ``.done.json`` marker written last. When all are done
they are merged with the indexed-dataset builder's ``add_index``. Bad items (malformed JSON,
missing fields, missing or unreadable images/videos) are skipped and reported with their
file, line and reason, or raise with ``strict``.

Re-runs are content-addressed: each shard has a key hashing the settings, the tokenizer's and
encoder's bytes, and the bytes of its input and of every media file it names. A shard whose
key matches one already made (by a stopped run, or in the last complete output) is reused,
not tokenized or encoded again; when every key matches, the run says "nothing to do". What
the key covers, and what hashing costs, is in ``digests.py``.

The modules, in the order data flows through them:

- ``config``: ``PreprocessConfig`` (the flags), the checks made before anything is written, errors.
- ``readers``: inputs -> shards (``ShardSpec``) -> items (dicts shaped like a JSONL line).
- ``documents``: an item -> token ids + visual items (``ItemProcessor``).
- ``encoders``: images/frames -> pixel patches or RAE/VAE latents.
- ``digests``: the content keys of shards.
- ``shards``: writing one shard (or copying a reused one), merging shards into the output.
- ``run``: the driver, ``run_preprocess(cfg) -> PreprocessSummary``.
- ``cli``: the argparse command line, ``main(argv)``.
"""

from megafusion.data.preprocess.cli import build_parser, main
from megafusion.data.preprocess.config import (ENCODERS, KINDS, ItemError, PreprocessConfig, PreprocessError,
                                               check_tokenizer, prepare_output)
from megafusion.data.preprocess.digests import file_digest, shard_key, tree_digest
from megafusion.data.preprocess.documents import ItemProcessor, load_image
from megafusion.data.preprocess.encoders import PixelEncoder, RepresentationEncoder, make_encoder
from megafusion.data.preprocess.readers import (CAPTION_EXTS, IMAGE_EXTS, VIDEO_EXTS, ShardSpec, input_format,
                                                iter_items, iter_shards)
from megafusion.data.preprocess.run import PreprocessSummary, run_preprocess
from megafusion.data.preprocess.shards import merge_shards, process_shard

__all__ = [
    "CAPTION_EXTS", "ENCODERS", "IMAGE_EXTS", "KINDS", "VIDEO_EXTS", "ItemError", "ItemProcessor", "PixelEncoder",
    "PreprocessConfig", "PreprocessError", "PreprocessSummary", "RepresentationEncoder", "ShardSpec", "build_parser",
    "check_tokenizer", "file_digest", "input_format", "iter_items", "iter_shards", "load_image", "main",
    "make_encoder", "merge_shards", "prepare_output", "process_shard", "run_preprocess", "shard_key", "tree_digest",
]
