"""Splits documents into overlapping, sentence-aware chunks that remember their spans (vectors layer)."""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from crewdb.models import Chunk

# Where a new sentence may start: after . ! ? … (and any closing quotes or brackets) followed by
# whitespace, after CJK full stops, and after line breaks (headings, list items, paragraphs).
_SENTENCE_STARTS = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]\s*|\n\s*")
_WORD_STARTS = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Chunker:
    """Chunks of at most `size` characters; neighbours share at most `overlap` of them.

    A chunk ends at the last sentence start that leaves it at least half full (and reaches past
    the previous chunk), else at the last word start, else mid-word at `size`. The next chunk
    begins at the first sentence (else word) start within the previous chunk's last `overlap`
    characters. Every character is in some chunk, and each chunk starts at least
    `(size - overlap) // 2` characters after the one before, so any input ends in at most about
    `2 * len(text) / (size - overlap)` chunks.
    """

    size: int = 1000
    overlap: int = 200

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"chunk size must be at least 1, not {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(
                f"chunk overlap must be from 0 to size - 1 ({self.size - 1}), not {self.overlap}"
            )

    def split(self, text: str) -> list[Chunk]:
        """The chunks of `text`, in order; one chunk when it fits, none when it is empty."""
        length = len(text)
        if length <= self.size:
            return [Chunk(0, 0, length, text)] if text else []
        sentences = [m.end() for m in _SENTENCE_STARTS.finditer(text)]
        words = [m.end() for m in _WORD_STARTS.finditer(text)]
        least_step = max(1, (self.size - self.overlap) // 2)
        chunks: list[Chunk] = []
        start = end = 0
        while True:
            limit = start + self.size
            if limit >= length:
                end = length
            else:
                # At least half full, and past the previous chunk's end (a chunk inside its
                # predecessor would add nothing but a duplicate).
                lowest = max(start + max(1, self.size // 2), end + 1)
                end = _last(sentences, lowest, limit) or _last(words, lowest, limit) or limit
            chunks.append(Chunk(len(chunks), start, end, text[start:end]))
            if end >= length:
                return chunks
            if self.overlap == 0:
                start = end
                continue
            floor = min(max(end - self.overlap, start + least_step), end)
            start = _first(sentences, floor, end) or _first(words, floor, end) or floor


def _last(positions: list[int], low: int, high: int) -> int | None:
    """The largest position in [low, high], if any."""
    i = bisect_right(positions, high)
    return positions[i - 1] if i and positions[i - 1] >= low else None


def _first(positions: list[int], low: int, high: int) -> int | None:
    """The smallest position in [low, high), if any."""
    i = bisect_left(positions, low)
    return positions[i] if i < len(positions) and positions[i] < high else None
