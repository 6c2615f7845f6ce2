"""The command line (``megafusion preprocess-data``, ``tools/preprocess_data.py``): flags -> ``PreprocessConfig``
-> ``run_preprocess``; errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from megafusion.data.preprocess.config import ENCODERS, KINDS, PreprocessConfig, PreprocessError
from megafusion.data.preprocess.run import run_preprocess
from megafusion.data.tokenizer import SENTENCEPIECE, TOKENIZER_TYPES


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the description's line breaks."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megafusion preprocess-data", formatter_class=_Formatter,
        description="Preprocess JSONL corpora, webdataset tars or folders into megatron-core indexed datasets "
                    "(+ a visual store). Examples: tools/preprocess_data.py; format: megafusion/data/indexed.py.")
    g = p.add_argument_group("input/output")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), one item per line; or webdataset .tar files / folders of "
                        "KEY.{jpg,png,...}+KEY.txt (image-text) or KEY.{mp4,webm,...}[+KEY.txt] (video)")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output dataset(s)")
    g.add_argument("--kind", choices=KINDS, default="text", help="what the items hold")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="text: fields to tokenize, one dataset each; image-text: fields joined into the "
                        "image's text (e.g. question answer)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=SENTENCEPIECE,
                   help="how --tokenizer-model is read (Megatron's names); special tokens the model lacks "
                        "(<pad> <boi> <eoi> <frame>, <eod> without an eos) are appended after its vocabulary")
    g.add_argument("--tokenizer-model", required=True,
                   help="a sentencepiece .model (any; e.g. from tools/train_tokenizer.py), or with "
                        "--tokenizer-type HuggingFaceTokenizer a local Hugging Face tokenizer directory "
                        "(tokenizer.json; nothing is downloaded)")
    g.add_argument("--append-eod", action="store_true",
                   help="end every document with the end-of-document id (the tokenizer's eos, else an appended "
                        "<eod>), as Megatron's tool does; without it documents are stored as their tokens only "
                        "and packed back to back with no separator")
    g = p.add_argument_group("images and video")
    g.add_argument("--encoder", choices=ENCODERS, default="pixel",
                   help="pixel: raw resized pixels as patches; rae/vae: latents from megafusion.vision")
    g.add_argument("--encoder-path", default=None, help="rae/vae checkpoint or config")
    g.add_argument("--image-size", type=int, default=64, help="resize (shorter side) + center crop to this")
    g.add_argument("--patch-size", type=int, default=8, help="pixel encoder patch size")
    g.add_argument("--image-first", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                   help="image-text: put the image before its text (captioning/VQA) for this fraction of "
                        "items, chosen per item by a hash of file and line (no value: all)")
    g.add_argument("--max-frames", type=int, default=None, help="video clip length (first frames)")
    g.add_argument("--frame-stride", type=int, default=1, help="keep every N-th frame")
    g.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate")
    g.add_argument("--context-frames", type=int, default=4, help="action-video: clean conditioning frames")
    g.add_argument("--video-backend", default="auto", help="auto|pyav|dali-cpu|dali-gpu")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1, help="processes making shards in parallel")
    g.add_argument("--shard-size", type=int, default=10000, help="input lines per shard")
    g.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    g.add_argument("--max-shards", type=int, default=None, help="stop after N shards without merging")
    g.add_argument("--keep-shards", action="store_true", help="keep OUT.shards/ after merging")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model,
        tokenizer_type=a.tokenizer_type, kind=a.kind,
        json_keys=tuple(a.json_keys), append_eod=a.append_eod, encoder=a.encoder, encoder_path=a.encoder_path,
        image_size=a.image_size, patch_size=a.patch_size, image_first=a.image_first, max_frames=a.max_frames,
        frame_stride=a.frame_stride, fps=a.fps, context_frames=a.context_frames, video_backend=a.video_backend,
        workers=a.workers, shard_size=a.shard_size, strict=a.strict, max_shards=a.max_shards,
        keep_shards=a.keep_shards, progress=not a.no_progress)
    try:
        summary = run_preprocess(cfg)
    except PreprocessError as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 2  # a usage error, as argparse's
    print(summary.format())
    return 0
