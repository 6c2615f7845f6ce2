"""Text tokenizers: any sentencepiece model or Hugging Face tokenizer, plus the special tokens
megafusion's sequence format needs.

Types (Megatron's names; ``data.tokenizer_type`` / ``--tokenizer-type``):

- ``SentencePieceTokenizer``: a sentencepiece ``.model`` file (``data.tokenizer``);
- ``HuggingFaceTokenizer``: a local Hugging Face tokenizer directory (its ``tokenizer.json``
  through the ``tokenizers`` library; ``transformers.AutoTokenizer`` with
  ``local_files_only=True`` when only other files are there). Nothing is ever downloaded.

(``data.tokenizer`` unset: the byte tokenizer, ``megafusion.data.byte_tokenizer``.)

Special tokens:

- ``<pad>``   padding, also the token id at latent positions;
- ``<boi>``   begin of image: the position before an image/frame span of latent patches;
- ``<eoi>``   end of image: the position after the span;
- ``<frame>`` separator between the frames of one video;
- the end-of-document id: the model's eos (sentencepiece's ``</s>``, a Hugging Face
  tokenizer's ``eos_token``) if it has one, else an appended ``<eod>``;
- action tokens ``<act_NAME>`` (optional): one token per discrete action of an
  action-conditioned video. Actions without a token are written as ordinary text.

Each special is the model's own piece when the model has it (``tools/train_tokenizer.py``
reserves them all: ``<unk> <s> </s> <pad>`` are 0-3, the user-defined symbols follow) and is
otherwise *added*: id ``base_vocab_size + k``, after the model's vocabulary, in the order
``<pad> <boi> <eoi> <frame> <eod>`` then the requested actions. Ordinary text is encoded by
the model alone, so its ids are exactly the tokenizer's own. ``vocab_size`` counts the added
ids; the model's embedding needs at least that many rows (``padded_vocab_size``: Megatron's
``make_vocab_size_divisible_by`` rounding). ``mapping()`` (type, base size, special name ->
id, a content hash of the tokenizer's files) is stored beside preprocessed data and in the
run directory, and training refuses data whose mapping differs from its tokenizer's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

PAD, BOI, EOI, FRAME = "<pad>", "<boi>", "<eoi>", "<frame>"
MARKER_TOKENS = (BOI, EOI, FRAME)
PAD_ID = 3  # in models from tools/train_tokenizer.py


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


SENTENCEPIECE, HUGGINGFACE = "SentencePieceTokenizer", "HuggingFaceTokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)
EOD = "<eod>"
MAP_FILE = "tokenizer_map.json"  # in the run directory; beside data: <prefix>.tokenizer_map.json


def padded_vocab_size(n: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's vocabulary padding: ``n`` rounded up to a multiple of ``divisible_by * tp``
    (``--make-vocab-size-divisible-by``, default 128). ``model.vocab_size`` should be at least
    this for a tokenizer of ``n`` ids (``vocab_size``, added specials included)."""
    multiple = int(divisible_by) * int(tp)
    if n < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size needs n >= 1 and divisible_by * tp >= 1, got {n}, {divisible_by}, {tp}")
    return -(-int(n) // multiple) * multiple


def files_digest(path: str | os.PathLike) -> str:
    """sha256 of a tokenizer file, or over a directory's files (relative name + bytes)."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        h.update(root.read_bytes())
        return h.hexdigest()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root)}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class _SpecialTokens:
    """The special-token ids over a base tokenizer: its own pieces where it has them, appended
    ids after its vocabulary otherwise. Subclasses set ``base_vocab_size`` and implement
    ``_piece_id`` (None when absent), ``_eos_id``, ``_encode_base`` and ``_decode_base``."""

    type: str = ""

    def _init_specials(self, actions: Iterable[str] = ()) -> None:
        self.added: list[str] = []  # added pieces; id = base_vocab_size + position

        def special(piece: str, own: int | None = None) -> int:
            if own is None:
                own = self._piece_id(piece)
            if own is not None:
                return own
            self.added.append(piece)
            return self.base_vocab_size + len(self.added) - 1

        self.pad_id = special(PAD)
        self.boi_id = special(BOI)
        self.eoi_id = special(EOI)
        self.frame_id = special(FRAME)
        self.eod_id = special(EOD, self._eos_id())
        self.bos_id = self._bos_id()
        own_actions = self._own_actions()
        for a in actions:
            if str(a) not in own_actions:
                own_actions[str(a)] = special(action_piece(a))
        self._actions = own_actions
        self._added_index = {self.base_vocab_size + k: piece for k, piece in enumerate(self.added)}

    # hooks -------------------------------------------------------------------------------
    def _bos_id(self) -> int | None:
        return None

    def _own_actions(self) -> dict[str, int]:
        return {}

    # the interface the data streams use --------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids in use: the base vocabulary plus the added specials."""
        return self.base_vocab_size + len(self.added)

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text: exactly the base tokenizer's own."""
        return self._encode_base(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: base ids through the base tokenizer; added ``<pad>``/``<eod>`` and ids
        past the vocabulary dropped; other added specials written as their piece (``<boi>``)."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if 0 <= i < self.base_vocab_size:
                run.append(i)
                continue
            piece = self._added_index.get(i)
            if piece is None or piece in (PAD, EOD):
                continue
            if run:
                out.append(self._decode_base(run))
                run = []
            out.append(piece)
        if run:
            out.append(self._decode_base(run))
        return "".join(out)

    def action_ids(self) -> dict[str, int]:
        """Action name -> token id (do not modify)."""
        return self._actions

    def encode_action(self, action) -> list[int]:
        """Token ids of one action: its token if it has one, else the action as text.

        ``action`` is a name (``"W"``), a number or a list of numbers (written ``"0.5 -1"``).
        """
        if isinstance(action, str):
            if action in self._actions:
                return [self._actions[action]]
            return self.encode(action)
        if isinstance(action, bool) or not isinstance(action, (int, float, list, tuple)):
            raise TypeError(f"action must be a string, a number or a list of numbers, got {action!r}")
        values = action if isinstance(action, (list, tuple)) else [action]
        return self.encode(" ".join(f"{float(v):g}" for v in values))

    def special_tokens(self) -> dict[str, int]:
        out = {"pad": self.pad_id, "boi": self.boi_id, "eoi": self.eoi_id, "frame": self.frame_id, "eod": self.eod_id}
        if self.bos_id is not None:
            out["bos"] = self.bos_id
        return out

    def mapping(self) -> dict:
        """What data made with this tokenizer depends on: stored beside it and in the run dir."""
        return {"type": self.type, "base_vocab_size": int(self.base_vocab_size), "vocab_size": int(self.vocab_size),
                "special_tokens": {k: int(v) for k, v in self.special_tokens().items()},
                "added_tokens": list(self.added),
                "action_tokens": {str(k): int(v) for k, v in self.action_ids().items()},
                "sha256": files_digest(self.path), "path": str(Path(self.path).resolve())}


class Tokenizer(_SpecialTokens):
    """A sentencepiece model (``SentencePieceTokenizer``), loaded from ``path`` (a ``.model`` file).

    ``actions``: action names to give a token when the model has no ``<act_NAME>`` piece.
    """

    type = SENTENCEPIECE

    def __init__(self, path: str | os.PathLike, actions: Iterable[str] = ()):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"tokenizer {self.path} is a directory, not a sentencepiece .model file; for a "
                             f"Hugging Face tokenizer directory use the tokenizer type {HUGGINGFACE}")
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} not found; train one with tools/train_tokenizer.py")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.base_vocab_size = self.sp.get_piece_size()
        self._init_specials(actions)

    def _piece_id(self, piece: str) -> int | None:
        if piece == PAD and self.sp.pad_id() >= 0:  # the model's pad, whatever its piece is called
            return self.sp.pad_id()
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            return None
        return i

    def _eos_id(self) -> int | None:
        eos = self.sp.eos_id()
        return eos if eos >= 0 else None

    def _bos_id(self) -> int | None:
        bos = self.sp.bos_id()
        return bos if bos >= 0 else None

    def _own_actions(self) -> dict[str, int]:
        out = {}
        for i in range(self.base_vocab_size):
            piece = self.sp.id_to_piece(i)
            if piece.startswith("<act_") and piece.endswith(">") and self.sp.is_control(i) is False:
                out[piece[5:-1]] = i
        return out

    def _encode_base(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def _decode_base(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


SentencePieceTokenizer = Tokenizer


def _hf_eos_piece(path: Path) -> str | None:
    """The ``eos_token`` a Hugging Face tokenizer directory names (tokenizer_config.json or
    special_tokens_map.json), None without one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


class HuggingFaceTokenizer(_SpecialTokens):
    """A local Hugging Face tokenizer (``HuggingFaceTokenizer``): a directory holding
    ``tokenizer.json`` (read by the ``tokenizers`` library), or a ``tokenizer.json`` file; a
    directory with only other files (``tokenizer.model``, ``vocab.json`` + ``merges.txt``) is
    read by ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``.
    Ids of text are ``encode(text, add_special_tokens=False)``'s."""

    type = HUGGINGFACE

    def __init__(self, path: str | os.PathLike, actions: Iterable[str] = ()):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Hugging Face tokenizer {self.path} not found (a local directory with "
                                    "tokenizer.json; nothing is downloaded)")
        directory = self.path if self.path.is_dir() else self.path.parent
        file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        self.hf = self.auto = None
        if file.is_file():
            from tokenizers import Tokenizer as HFTok

            try:
                self.hf = HFTok.from_file(str(file))
            except Exception as err:  # the Rust library raises its own exception type
                raise ValueError(f"{file} is not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
            self.base_vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self._vocab = self.hf.get_vocab(with_added_tokens=True)
        elif self.path.is_dir():
            try:
                from transformers import AutoTokenizer

                self.auto = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except Exception as err:
                raise ValueError(f"{self.path} holds no tokenizer.json and transformers cannot load it locally "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
            self._vocab = self.auto.get_vocab()
            self.base_vocab_size = max(len(self.auto), max(self._vocab.values(), default=-1) + 1)
        else:
            raise ValueError(f"{self.path} is neither a Hugging Face tokenizer directory nor a tokenizer.json file")
        self._eos_piece = _hf_eos_piece(directory)
        if self._eos_piece is None and self.auto is not None:
            self._eos_piece = self.auto.eos_token
        self._init_specials(actions)

    def _piece_id(self, piece: str) -> int | None:
        return self._vocab.get(piece)

    def _eos_id(self) -> int | None:
        for piece in (self._eos_piece, EOD):
            if piece is not None and piece in self._vocab:
                return self._vocab[piece]
        return None

    def _own_actions(self) -> dict[str, int]:
        return {p[5:-1]: i for p, i in self._vocab.items() if p.startswith("<act_") and p.endswith(">") and len(p) > 6}

    def _encode_base(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        return self.auto.encode(text, add_special_tokens=False)

    def _decode_base(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.auto.decode(ids, skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike | None, type: str | None = SENTENCEPIECE, actions: Iterable[str] = ()):
    """The one factory for text tokenizers: the byte tokenizer for ``path`` None, else
    ``type`` (``SentencePieceTokenizer`` or ``HuggingFaceTokenizer``; None: the latter for a
    directory or a ``.json`` file, the former otherwise) loaded from ``path``."""
    if path is None:
        from megafusion.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if type is None:
        type = HUGGINGFACE if Path(path).is_dir() or str(path).endswith(".json") else SENTENCEPIECE
    if type == SENTENCEPIECE:
        return Tokenizer(path, actions)
    if type == HUGGINGFACE:
        return HuggingFaceTokenizer(path, actions)
    raise ValueError(f"tokenizer type must be one of {TOKENIZER_TYPES}, got {type!r}")


def mapping_problem(stored: dict, tokenizer, where: str, configured: str) -> str | None:
    """One line when the ``stored`` mapping (of data, or of a run) differs from ``tokenizer``'s:
    the type, the file hash, the base size or a special id; None when they agree."""
    mine = tokenizer.mapping()
    keys = ("type", "sha256", "base_vocab_size", "special_tokens")
    diff = [k for k in keys if k in stored and stored[k] != mine.get(k)]
    if not diff:
        return None
    return (f"{where} was preprocessed with the tokenizer {stored.get('path')} ({stored.get('type')}, sha256 "
            f"{str(stored.get('sha256'))[:12]}), but {configured} ({mine['type']}, sha256 {mine['sha256'][:12]}) is "
            f"another tokenizer (they differ in {', '.join(diff)}): preprocess the data again with it, or configure "
            "the tokenizer the data was made with")


def copy_tokenizer(src: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Copies a tokenizer (a ``.model`` file or a Hugging Face directory) into ``dest_dir``
    under its own name, replacing an older copy; returns the copy's path."""
    import shutil

    src = Path(src)
    target = Path(dest_dir) / src.name
    if src.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(src, target)
    else:
        shutil.copy2(src, target)
    return target


def write_tokenizer_map(data_cfg, run_dir: str | os.PathLike) -> Path | None:
    """Writes ``tokenizer_map.json`` (the configured tokenizer's ``mapping()``) into the run
    directory when ``data.tokenizer`` is set; returns its path."""
    if data_cfg.tokenizer is None:
        return None
    tok = load_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_type)
    out = Path(run_dir) / MAP_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(tok.mapping(), indent=1))
    os.replace(tmp, out)
    return out


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
