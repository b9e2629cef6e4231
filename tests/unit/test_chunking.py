"""Chunker: chunks cover the text exactly, stay within size and overlap, and cut at sentences."""

from __future__ import annotations

import string
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crewdb.models import Chunk
from crewdb.vectors.chunking import Chunker

_LETTERS = string.ascii_letters + "éßжλ漢字"
_PUNCTUATION = ".!?\u2026\u3002\uff01\uff1f\"')]\u201d\u2019,;:-"


def _repeated(piece: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Long texts built cheaply: a short piece repeated up to a few hundred times."""
    return st.tuples(piece, st.integers(1, 400)).map(lambda pair: (pair[0] * pair[1])[:5000])


_WORD = st.text(alphabet=_LETTERS, min_size=1, max_size=12)
_SENTENCE = st.tuples(
    st.lists(_WORD, min_size=1, max_size=15).map(" ".join),
    st.sampled_from([". ", "! ", "? ", "… ", '." ', ".) ", "。", "\n", "\n\n", ".\n- ", " "]),
).map("".join)

TEXTS = st.one_of(
    st.text(max_size=5000),  # any code points, control characters included
    st.text(alphabet=st.characters(exclude_categories=("Z", "Cc")), max_size=5000),  # no spaces at all
    st.text(alphabet=_PUNCTUATION, max_size=3000),
    _repeated(st.text(alphabet=_PUNCTUATION + " \n", min_size=1, max_size=20)),
    st.text(alphabet="\n", max_size=3000),
    _repeated(st.sampled_from(["\n", "\n\n", "\r\n", " \n ", "\t"])),
    st.lists(st.text(alphabet=_LETTERS, min_size=1, max_size=2000), max_size=5).map(" ".join),
    st.lists(_SENTENCE, max_size=120).map("".join),
    _repeated(_SENTENCE),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Chunker]:
    """A text and a chunker, mostly one that must cut the text into several chunks."""
    text = draw(TEXTS)
    size = draw(st.one_of(st.integers(1, 12), st.integers(1, max(1, len(text))), st.integers(1, 1200)))
    overlap = draw(st.one_of(st.just(0), st.integers(0, size - 1), st.integers(size // 2, size - 1)))
    return text, Chunker(size, overlap)


fast = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(case=cases())
def test_chunks_cover_the_text_exactly_within_size_and_overlap(case: tuple[str, Chunker]) -> None:
    text, chunker = case
    chunks = chunker.split(text)
    if not text:
        assert chunks == []
        return
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0
    assert chunks[-1].end == len(text)
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert 0 < chunk.end - chunk.start <= chunker.size
    for before, after in pairwise(chunks):
        assert before.start < after.start, "starts strictly increase"
        assert after.start <= before.end, "no character falls between two chunks"
        assert before.end - after.start <= chunker.overlap


@fast
@given(case=cases())
def test_chunk_count_is_bounded_by_the_least_step(case: tuple[str, Chunker]) -> None:
    text, chunker = case
    chunks = chunker.split(text)
    # The docstring's guarantee: each chunk starts at least (size - overlap) // 2 after the last.
    least_step = max(1, (chunker.size - chunker.overlap) // 2)
    for before, after in pairwise(chunks):
        assert after.start - before.start >= least_step
    if text:
        assert len(chunks) <= 1 + (len(text) - 1) // least_step
        assert len(chunks) <= 2 * len(text) / (chunker.size - chunker.overlap) + 2


@fast
@given(case=cases())
def test_text_that_fits_is_one_chunk(case: tuple[str, Chunker]) -> None:
    text, chunker = case
    fitting = text[: chunker.size]
    expected = [Chunk(0, 0, len(fitting), fitting)] if fitting else []
    assert chunker.split(fitting) == expected


def test_empty_text_has_no_chunks() -> None:
    assert Chunker(10, 2).split("") == []
    assert Chunker().split("") == []


def test_text_of_exactly_size_is_one_chunk() -> None:
    assert Chunker(5, 1).split("abcde") == [Chunk(0, 0, 5, "abcde")]


def test_chunk_ends_at_a_sentence_start_past_half_the_size() -> None:
    # A sentence start at 25 (past half of 40) and word starts later: the cut is at the sentence.
    text = "Alpha beta gamma delta e. Zeta eta theta iota kappa lambda mu nu xi omicron pi rho."
    chunks = Chunker(40, 0).split(text)
    assert chunks[0].text == "Alpha beta gamma delta e. "
    assert chunks[1].start == 26
    assert text[chunks[1].start :].startswith("Zeta")


def test_sentence_start_before_half_the_size_is_not_used() -> None:
    # The only sentence start is at 5, before half of 40, so the cut falls at the last word start.
    text = "Ab. cdefghij klmnopqr stuvwxyz abcdefgh ijklmnop qrstuvwx yz"
    chunks = Chunker(40, 0).split(text)
    assert chunks[0].text == "Ab. cdefghij klmnopqr stuvwxyz abcdefgh "
    assert chunks[0].end == 40


def test_line_breaks_count_as_sentence_starts() -> None:
    text = "# Heading of the page\n" + "word " * 20
    chunks = Chunker(30, 0).split(text)
    assert chunks[0].text == "# Heading of the page\n"


def test_chunk_without_any_break_is_cut_mid_word_at_size() -> None:
    text = "x" * 25
    chunks = Chunker(10, 3).split(text)
    assert [(c.start, c.end) for c in chunks] == [(0, 10), (7, 17), (14, 24), (21, 25)]


def test_overlap_begins_at_a_sentence_start_when_available() -> None:
    # First chunk ends at the sentence start at 42; its last 20 characters hold a sentence start
    # at 28 ("Two") and word starts after it: the overlap begins at the sentence.
    text = "One two three four five six. Two b c d e. Three and more words follow here."
    chunks = Chunker(45, 20).split(text)
    assert chunks[0].end == 42
    assert chunks[1].start == 29
    assert chunks[1].text.startswith("Two b c d e. ")


def test_overlap_begins_at_a_word_start_without_a_sentence_start() -> None:
    text = "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj"
    chunks = Chunker(20, 8).split(text)
    assert chunks[0].text == "aaaa bbbb cccc dddd "
    assert chunks[1].start == 15
    assert chunks[1].text.startswith("dddd ")


def test_each_chunk_reaches_past_the_one_before() -> None:
    # With an overlap above half the size, the second chunk may start at the sentence start at 4
    # and end again at the sentence start at 15: a chunk wholly inside its predecessor adds no
    # text, only a duplicate embedding and a duplicate search hit.
    text = "Ab. Cdefghijk. Lmnopqrstuvwxyzabcdefg"
    chunks = Chunker(20, 12).split(text)
    spans = [(chunk.start, chunk.end) for chunk in chunks]
    assert all(a_end < b_end for (_, a_end), (_, b_end) in pairwise(spans)), spans


def test_without_overlap_chunks_are_disjoint_and_adjacent() -> None:
    text = "Sentence one here. Sentence two here. Sentence three here. Sentence four."
    chunks = Chunker(30, 0).split(text)
    assert all(a.end == b.start for a, b in pairwise(chunks))
    assert "".join(chunk.text for chunk in chunks) == text


@pytest.mark.parametrize(
    ("size", "overlap"),
    [(0, 0), (-1, 0), (10, 10), (10, 11), (10, -1), (1, 1)],
)
def test_invalid_size_or_overlap_is_a_value_error(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        Chunker(size, overlap)


def test_smallest_valid_chunker_yields_one_character_chunks() -> None:
    assert [c.text for c in Chunker(1, 0).split("abc")] == ["a", "b", "c"]
