"""Parsing completions into candidates with character spans (shapegrpo_core/candidates.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shapegrpo_core.candidates import STYLES, Candidate, detect_style, parse_candidates


def texts(completion: str, style: str = "auto", **kw) -> list[str]:
    cands = parse_candidates(completion, style=style, **kw)
    check_spans(completion, cands)
    return [c.text for c in cands]


def check_spans(completion: str, cands: list[Candidate]) -> None:
    """The invariants every parse must satisfy: exact, tight, non-empty, ordered, disjoint spans."""
    prev_end = 0
    for c in cands:
        assert completion[c.start : c.end] == c.text
        assert c.text and c.text.rstrip() == c.text
        assert c.start >= prev_end
        prev_end = c.end


# ---------------------------------------------------------------- styles


def test_numbered_dot_and_paren_with_preamble_and_trailing_prose() -> None:
    completion = "Here are my picks:\n1. item_12\n2) item_7\n  3.  item_3  \nHope this helps!"
    assert texts(completion) == ["item_12", "item_7", "item_3"]
    assert texts(completion, "numbered") == ["item_12", "item_7", "item_3"]


def test_numbered_continuation_lines_belong_to_the_item() -> None:
    completion = "1. The cat sat\n   on the mat.\n2. A dog barked.\n\nThat's all."
    assert texts(completion) == ["The cat sat\n   on the mat.", "A dog barked."]


def test_numbered_single_line_and_word_level_decoding() -> None:
    # Word-level tokenizers decode onto one line and put a space before the "." ("1 . item_1").
    assert texts("1. a 2. b 3. c") == ["a", "b", "c"]
    assert texts("1 . item_1 2 . item_2") == ["item_1", "item_2"]
    assert texts("Top picks: 1) x 2) y") == ["x", "y"]
    # Mid-line numbers that do not continue the numbering are text, not markers.
    assert texts("1. rated 4. stars 2. fine") == ["rated 4. stars", "fine"]


def test_bullets_all_markers() -> None:
    assert texts("- a\n* b\n• c") == ["a", "b", "c"]
    assert texts("Intro\n  - nested item\n- x - y") == ["nested item", "x - y"]
    assert texts("- a - b - c") == ["a", "b", "c"]  # single line: repeated marker surrounded by spaces
    assert texts("• a • b") == ["a", "b"]
    assert texts("state-of-the-art - fine", "bullets") == []  # first bullet must start the text


def test_bullets_do_not_match_rules_or_bold() -> None:
    assert detect_style("---\n**bold** text") == "delimited"
    assert texts("**bold**\n- real", "bullets") == ["real"]


def test_fenced_blocks_keep_first_line_indentation() -> None:
    completion = (
        "Two options:\n```python\ndef f(x):\n    return x + 1\n```\nand\n"
        "````\n\n    y = 2\n    z = 3\n\n````\ntrailing"
    )
    assert texts(completion) == ["def f(x):\n    return x + 1", "    y = 2\n    z = 3"]


def test_fenced_unclosed_last_fence_is_not_a_candidate() -> None:
    completion = "```\na = 1\n```\n```python\nb = 2  # truncated at max_completion_length"
    assert texts(completion) == ["a = 1"]
    assert texts("```python\nonly unclosed") == []
    assert detect_style("```python\nonly unclosed") == "fenced"


def test_fenced_closing_rules() -> None:
    # A line with an info string does not close a fence; a shorter fence does not close a longer one.
    completion = "````\n```python\nx\n```\n````"
    assert texts(completion) == ["```python\nx\n```"]
    assert texts("```\n```") == []  # empty block skipped
    assert texts("```\n   \n\n```") == []


def test_delimited_default_custom_and_newlines() -> None:
    assert texts("item_12, item_7; item_3") == ["item_12", "item_7", "item_3"]
    assert texts("a|b, c", "delimited", delimiters="|") == ["a", "b, c"]
    assert texts("a\nb,,c;  ;d") == ["a", "b", "c", "d"]


def test_auto_detection_order() -> None:
    assert detect_style("1. a\n```\ncode\n```") == "fenced"
    assert detect_style("- x\n1. a") == "numbered"
    assert detect_style("- x\n- y") == "bullets"
    assert detect_style("x, y") == "delimited"


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    "completion",
    ["", "   \n\t ", "1.\n2.\n-\n", "```", "\x00\x01\x7f\ufffd", ",,,;;;", "\u2028\u00a0\u3000", "1)"],
)
def test_malformed_inputs_give_no_or_few_candidates_without_raising(style: str, completion: str) -> None:
    cands = parse_candidates(completion, style=style)
    check_spans(completion, cands)


def test_unicode_candidates() -> None:
    completion = "1. café 🎉\n2. 日本語\n3. naïve résumé"
    assert texts(completion) == ["café 🎉", "日本語", "naïve résumé"]


def test_duplicates_are_kept() -> None:
    assert texts("1. item_1\n2. item_1\n3. item_1") == ["item_1"] * 3
    assert texts("a, a") == ["a", "a"]


def test_too_many_candidates_are_all_returned() -> None:
    completion = "\n".join(f"{i}. item_{i}" for i in range(1, 1001))
    assert texts(completion) == [f"item_{i}" for i in range(1, 1001)]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="style"):
        parse_candidates("a", style="yaml")
    with pytest.raises(ValueError, match="str"):
        parse_candidates(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="span"):
        Candidate("abc", 0, 2)


# ---------------------------------------------------------------- properties

_MARKER_LIKE = re.compile(r"(?:^|\s)(?:\d+ ?[.)]|[-*•])(?=\s|$)")
_word = st.text(alphabet="abcXYZ019_.:!?'#/()éß日本🎉", min_size=1, max_size=6)
# Candidate texts: 1-4 words joined by single spaces (tight), none of which looks like a list marker.
_text = st.lists(_word, min_size=1, max_size=4).map(" ".join).filter(lambda t: not _MARKER_LIKE.search(t))
_code_line = st.text(alphabet="abc =+(x):1é日\t", max_size=12)
_code = st.lists(_code_line, min_size=1, max_size=4).map("\n".join).map(str.strip).filter(bool)


def _render(style: str, items: list[str], single_line: bool, seps: list[str]) -> str:
    if style == "numbered":
        lines = [f"{i + 1}{'.' if i % 2 == 0 else ')'} {t}" for i, t in enumerate(items)]
        return " ".join(lines) if single_line else "Answer:\n" + "\n".join(lines) + "\n"
    if style == "bullets":
        lines = [f"- {t}" for t in items]
        return (
            " ".join(lines) if single_line else "\n".join(f"{'-*•'[i % 3]} {t}" for i, t in enumerate(items))
        )
    if style == "delimited":
        out = items[0]
        for sep, t in zip(seps, items[1:], strict=False):
            out += sep + t
        return out
    return "Here:\n" + "\n\ntext\n".join(f"```python\n{t}\n```" for t in items)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    style=st.sampled_from(["numbered", "bullets", "delimited", "fenced"]),
    data=st.data(),
    single_line=st.booleans(),
)
def test_round_trip_rendered_candidates(style: str, data: st.DataObject, single_line: bool) -> None:
    items = data.draw(st.lists(_code if style == "fenced" else _text, min_size=1, max_size=8))
    seps = data.draw(st.lists(st.sampled_from([", ", ",", "; ", ",\n", "\n"]), min_size=8, max_size=8))
    completion = _render(style, items, single_line, seps)
    for parse_style in (style, "auto"):
        cands = parse_candidates(completion, style=parse_style)
        check_spans(completion, cands)
        assert [c.text for c in cands] == items, (parse_style, completion)


@settings(max_examples=200, deadline=None)
@given(completion=st.text(max_size=200), style=st.sampled_from(STYLES), delimiters=st.text(max_size=3))
def test_never_raises_and_spans_are_exact(completion: str, style: str, delimiters: str) -> None:
    check_spans(completion, parse_candidates(completion, style=style, delimiters=delimiters))


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(["1.", "2)", "-", "*", "•", "```", "```py", "\n", " ", ",", "x", "é", "日"])
    )
)
def test_never_raises_on_marker_soup(parts: list[str]) -> None:
    completion = "".join(parts)
    for style in STYLES:
        check_spans(completion, parse_candidates(completion, style=style))
