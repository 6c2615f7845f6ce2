"""The sentencepiece tokenizer keeps megafusion's special tokens as single pieces."""

import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.data.tokenizer import BOI, EOI, FRAME, PAD, Tokenizer, action_piece, train_tokenizer

WORDS = "the a red blue circle square moves left right up down on top of big small green".split()


def write_corpus(path: Path, lines: int = 300) -> Path:
    import random

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)))
    return path


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_special_tokens_are_single_pieces(tmp_path, model_type):
    corpus = write_corpus(tmp_path / "c.txt")
    tok = Tokenizer(train_tokenizer([corpus], tmp_path / "tok", vocab_size=400, model_type=model_type,
                                    actions=["W", "left"]))
    ids = {tok.pad_id, tok.boi_id, tok.eoi_id, tok.frame_id, tok.eod_id}
    assert len(ids) == 5 and tok.pad_id == tok.sp.pad_id()
    for piece, tid in [(PAD, tok.pad_id), (BOI, tok.boi_id), (EOI, tok.eoi_id), (FRAME, tok.frame_id)]:
        assert tok.sp.id_to_piece(tid) == piece
    # markers inside text stay whole and decode back
    text = f"a red circle {BOI}{EOI} moves {FRAME} left"
    ids = tok.encode(text)
    assert tok.boi_id in ids and tok.eoi_id in ids and tok.frame_id in ids
    assert tok.decode(ids) == text
    # reserved actions are one token; others are written as text
    assert tok.action_ids() == {"W": tok.sp.piece_to_id(action_piece("W")), "left": tok.sp.piece_to_id("<act_left>")}
    assert tok.encode_action("W") == [tok.action_ids()["W"]]
    assert tok.encode_action("jump") == tok.encode("jump")
    assert tok.decode(tok.encode_action([0.5, -1])) == "0.5 -1"
    # byte fallback: unseen characters round-trip instead of becoming <unk>
    assert tok.decode(tok.encode("größe ✓")) == "größe ✓"


def test_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="HuggingFaceTokenizer"):
        Tokenizer(tmp_path)  # a directory: names the other type
    # a plain sentencepiece model without the reserved tokens is accepted: they are appended
    import sentencepiece as spm

    corpus = write_corpus(tmp_path / "c.txt")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=40,
                                   minloglevel=2)
    tok = Tokenizer(tmp_path / "plain.model")
    assert tok.base_vocab_size == 40 and tok.vocab_size == 44  # <pad> <boi> <eoi> <frame>; eos is </s>
    assert (tok.pad_id, tok.boi_id, tok.eoi_id, tok.frame_id) == (40, 41, 42, 43) and tok.eod_id == 2


def test_train_tokenizer_cli(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools/train_tokenizer.py"), "--input", str(corpus),
                          "--model-prefix", str(tmp_path / "cli"), "--vocab-size", "350", "--actions", "W,A,S,D"],
                         capture_output=True, text=True, check=True)
    assert "vocab" in out.stdout
    tok = Tokenizer(tmp_path / "cli.model")
    assert sorted(tok.action_ids()) == ["A", "D", "S", "W"]
