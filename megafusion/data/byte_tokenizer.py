"""A deterministic byte-level tokenizer: no training, no file (``data.tokenizer: null``).

Ids 0-255 are the UTF-8 bytes; then the specials ``<pad> <boi> <eoi> <frame> <eod>`` and
one token per ShapesWorld action (``<act_up>``, ...). It has the same interface as the
sentencepiece ``megafusion.data.tokenizer.Tokenizer`` that the data stream uses.
"""

from __future__ import annotations

from collections.abc import Iterable

from megafusion.data.shapes.video import ACTIONS

SPECIALS = ("<pad>", "<boi>", "<eoi>", "<frame>", "<eod>")


class ByteTokenizer:
    type = "byte"
    path = None

    def __init__(self, actions: Iterable[str] = ACTIONS) -> None:
        self.actions = tuple(actions)
        self.pieces = [bytes([b]) for b in range(256)] + list(SPECIALS) + [f"<act_{a}>" for a in self.actions]
        self.pad_id, self.boi_id, self.eoi_id, self.frame_id, self.eod_id = range(256, 256 + len(SPECIALS))
        self._action_id = {a: 256 + len(SPECIALS) + k for k, a in enumerate(self.actions)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    base_vocab_size = vocab_size
    bos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes as text (invalid UTF-8 replaced); specials spelled out."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self.pieces[i] if i < len(self.pieces) else f"<unk_{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def action_ids(self) -> dict[str, int]:
        return dict(self._action_id)

    def encode_action(self, action: str) -> list[int]:
        """The reserved token of a known action, else the action spelled as bytes."""
        if action in self._action_id:
            return [self._action_id[action]]
        return self.encode(str(action))

    def special_tokens(self) -> dict[str, int]:
        return {"pad": self.pad_id, "boi": self.boi_id, "eoi": self.eoi_id, "frame": self.frame_id, "eod": self.eod_id}

    def mapping(self) -> dict:
        """As ``megafusion.data.tokenizer``'s: the byte tokenizer has no file."""
        return {"type": self.type, "base_vocab_size": self.vocab_size, "vocab_size": self.vocab_size,
                "special_tokens": self.special_tokens(), "added_tokens": [], "action_tokens": self.action_ids(),
                "sha256": None, "path": None}
