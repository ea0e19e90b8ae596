"""A byte-level tokenizer: UTF-8 bytes are token ids 0-255, then four special tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar


class ByteTokenizer:
    """Maps text to UTF-8 byte values and back; ids 256-259 are [PAD], [CLS], [SEP], [MASK].

    GPT uses only the byte ids (vocabulary 256); BERT uses all 260.
    """

    PAD = 256
    CLS = 257
    SEP = 258
    MASK = 259
    SPECIALS: ClassVar[Mapping[int, str]] = {PAD: "[PAD]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}
    num_bytes = 256
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        """Takes text; returns its UTF-8 bytes as a list of ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Takes ids; returns the text, special tokens written as ``[NAME]``.

        Raises ``ValueError`` for an id outside [0, 260).
        """
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.num_bytes:
                buf.append(i)
                continue
            if i not in self.SPECIALS:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(self.SPECIALS[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
