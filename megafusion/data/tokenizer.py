"""The text tokenizer: a sentencepiece model with the special tokens megafusion needs.

Special tokens (always present, each one piece that plain text can also spell):

- ``<pad>``   padding (sentencepiece's pad id), also the token id at latent positions;
- ``<boi>``   begin of image: the position before an image/frame span of latent patches;
- ``<eoi>``   end of image: the position after the span;
- ``<frame>`` separator between the frames of one video;
- action tokens ``<act_NAME>`` (optional): one token per discrete action of an
  action-conditioned video (``W``, ``A``, ``left``, ...). Actions without a reserved token
  are written as ordinary text.

sentencepiece's own ``<unk>``, ``<s>`` (bos) and ``</s>`` (eos, the end-of-document token)
keep their ids 0, 1, 2; ``<pad>`` is 3; the user-defined symbols follow.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

PAD, BOI, EOI, FRAME = "<pad>", "<boi>", "<eoi>", "<frame>"
MARKER_TOKENS = (BOI, EOI, FRAME)
PAD_ID = 3


def action_piece(action: str) -> str:
    """The reserved piece for a discrete action name: ``W`` -> ``<act_W>``."""
    action = str(action)
    if not action or any(ch.isspace() for ch in action):
        raise ValueError(f"action name {action!r} must be non-empty and contain no whitespace")
    return f"<act_{action}>"


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    actions: Iterable[str] = (),
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    extra_options: dict | None = None,
) -> Path:
    """Trains a sentencepiece model on text files; returns the path of ``<prefix>.model``.

    ``files``: plain-text files, one sentence/paragraph per line (sentencepiece samples at
    most ``input_sentence_size`` lines, so huge corpora stay bounded in memory).
    ``model_type``: ``bpe`` or ``unigram``. ``actions``: action names to reserve as tokens.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"tokenizer training files not found: {missing or '(none given)'}")
    symbols = list(MARKER_TOKENS) + [action_piece(a) for a in actions]
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"duplicate special tokens in {symbols}")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    options = dict(
        input=",".join(str(f) for f in files),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=PAD_ID, pad_piece=PAD,
        user_defined_symbols=symbols,
        byte_fallback=True,  # no <unk> for unseen characters
        # a small corpus may not support the requested size; a smaller vocab is better than failing
        hard_vocab_limit=False,
        minloglevel=2,
    )
    options.update(extra_options or {})
    spm.SentencePieceTrainer.train(**options)
    return Path(f"{model_prefix}.model")


class Tokenizer:
    """A trained megafusion sentencepiece model, loaded from ``path`` (a ``.model`` file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} not found; train one with tools/train_tokenizer.py")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        missing = [t for t in (PAD, *MARKER_TOKENS) if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"tokenizer {self.path} lacks the special tokens {missing}; "
                             "train it with tools/train_tokenizer.py, which reserves them")
        self.pad_id = self.sp.piece_to_id(PAD)
        self.boi_id = self.sp.piece_to_id(BOI)
        self.eoi_id = self.sp.piece_to_id(EOI)
        self.frame_id = self.sp.piece_to_id(FRAME)
        self.eod_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @functools.cache
    def action_ids(self) -> dict[str, int]:
        """Reserved action name -> token id (a fresh dict is not made per call: do not modify)."""
        out = {}
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if piece.startswith("<act_") and piece.endswith(">") and self.sp.is_control(i) is False:
                out[piece[5:-1]] = i
        return out

    def encode_action(self, action) -> list[int]:
        """Token ids of one action: its reserved token if it has one, else the action as text.

        ``action`` is a name (``"W"``), a number or a list of numbers (written ``"0.5 -1"``).
        """
        if isinstance(action, str):
            if action and not any(ch.isspace() for ch in action):
                piece_id = self.sp.piece_to_id(action_piece(action))
                if piece_id != self.sp.unk_id():
                    return [piece_id]
            return self.encode(action)
        if isinstance(action, bool) or not isinstance(action, (int, float, list, tuple)):
            raise TypeError(f"action must be a string, a number or a list of numbers, got {action!r}")
        values = action if isinstance(action, (list, tuple)) else [action]
        return self.encode(" ".join(f"{float(v):g}" for v in values))


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_tokenizer.py", description="Train a megafusion sentencepiece tokenizer "
                                "(BPE or unigram) that reserves <pad>, <boi>, <eoi>, <frame> and action tokens.")
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
