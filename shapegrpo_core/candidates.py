"""Parse a completion into candidates with character spans (docs/method.md, "Tokens").

A completion answers one prompt with a *set* of candidates. The trainer needs, for each candidate, its text
(to score it) and its exact character span in the completion (to give the tokens of that span the
candidate's advantage, see ``tokens.py``). So every :class:`Candidate` satisfies ``completion[c.start:c.end]
== c.text``.

Styles (``parse_candidates(completion, style=...)``):

- ``"fenced"``: fenced code blocks, a line of three or more backticks (an optional info string such as
  ``python`` after it) up to a closing line of at least as many backticks and nothing else. The candidate is
  the code inside the fence. Leading blank lines and trailing whitespace are dropped, but the first code
  line keeps its indentation: stripping it alone would break code that is indented as a whole. A fence that
  is never closed (typically a completion truncated at ``max_completion_length``) is **not** a candidate:
  its code is incomplete, so scoring it would reward or punish a fragment. Fences must start a line
  (indentation allowed).
- ``"numbered"``: items whose line starts with ``1.`` or ``1)`` (any number, followed by whitespace or the
  end; ``1 .`` too, which is how word-level tokenizers decode ``1.``).
- ``"bullets"``: items whose line starts with ``-``, ``*`` or ``•`` followed by whitespace (or the end).
- ``"delimited"``: the text split at any of ``delimiters`` (default ``",;"``) and at newlines, e.g.
  ``"item_12, item_7; item_3"``.
- ``"auto"``: fenced if any line opens a fence, else numbered if any numbered marker is found, else bullets
  if any bullet marker is found, else delimited.

Rules shared by the list styles. An item runs from its marker to the next marker line, a blank line, or a
line that is not indented (trailing prose such as "Hope this helps" ends the list); indented lines continue
the item, so a wrapped summary stays one candidate. Text before the first marker (a preamble) belongs to no
candidate. Word-level tokenizers often decode a whole completion onto one line (``"1. a 2. b 3. c"``), so
when the stripped completion has no newline, markers are also recognised mid-line: numbered markers when
they continue the numbering (the first one at the start of the text or numbered 1; later ones numbered
previous + 1, so "rated 4. stars" inside an item is not a marker unless it is the next number), bullets when
they repeat the first bullet's character surrounded by whitespace (the first bullet must start the text,
except ``•``).

Candidate text is stripped of its marker and of surrounding whitespace, so spans are tight around the text.
Empty items are skipped. Duplicates are kept: the game scores them (Shapley splits their credit). There is
no cap on the number of candidates: callers score the first K and treat the rest as a format violation. The
parser never raises on malformed text (empty, garbage, unicode); only a wrong ``style`` or a non-string
raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STYLES = ("auto", "numbered", "bullets", "fenced", "delimited")


@dataclass(frozen=True)
class Candidate:
    """One candidate: ``completion[start:end] == text`` (character offsets, i.e. Python str indices)."""

    text: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"Candidate.text must be a str, got {type(self.text).__name__}")
        if not (0 <= self.start <= self.end) or self.end - self.start != len(self.text):
            raise ValueError(
                f"Candidate span [{self.start}, {self.end}) does not fit text of length {len(self.text)}"
            )


# A fence line: optional indentation, >= 3 backticks, an info string without backticks (CommonMark).
_FENCE = re.compile(r"[ \t]*(`{3,})([^`]*)")
# Markers are matched against one line (no newline inside), so \s never crosses lines here. A numbered
# marker may have one space before its "." or ")": word-level tokenizers decode "1." as "1 ." (tokens are
# joined by spaces).
_NUMBERED_AT_LINE_START = re.compile(r"\s*(\d{1,9}) ?[.)](?=\s|$)")
_BULLET_AT_LINE_START = re.compile(r"\s*([-*•])(?=\s|$)")
# Mid-line markers (single-line completions only): preceded by whitespace or the start of the text.
_NUMBERED_ANYWHERE = re.compile(r"(?:(?<=\s)|^)(\d{1,9}) ?[.)](?=\s|$)")
_BULLET_ANYWHERE = re.compile(r"(?:(?<=\s)|^)([-*•])(?=\s|$)")


def _tight(completion: str, start: int, end: int) -> Candidate | None:
    """The candidate for completion[start:end] stripped of surrounding whitespace; None if nothing is left."""
    piece = completion[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    if right <= left:
        return None
    return Candidate(piece[left:right], start + left, start + right)


def _lines(completion: str) -> list[tuple[int, int]]:
    """(start, end) of each line, end excluding the "\\n". Only "\\n" ends a line ("\\r" is whitespace)."""
    spans, pos = [], 0
    while True:
        nl = completion.find("\n", pos)
        if nl < 0:
            spans.append((pos, len(completion)))
            return spans
        spans.append((pos, nl))
        pos = nl + 1


def _parse_fenced(completion: str) -> list[Candidate]:
    out: list[Candidate] = []
    open_len, content_start = 0, -1  # open_len == 0: not inside a fence
    for ls, le in _lines(completion):
        m = _FENCE.fullmatch(completion, ls, le)
        if open_len == 0:
            if m is not None:
                open_len, content_start = len(m.group(1)), le + 1
        elif m is not None and len(m.group(1)) >= open_len and not m.group(2).strip():
            # Content is [content_start, ls - 1): up to the newline before the closing fence.
            cand = _tight_code(completion, content_start, max(content_start, ls - 1))
            if cand is not None:
                out.append(cand)
            open_len = 0
    return out  # an unclosed last fence is dropped (module docstring)


def _tight_code(completion: str, start: int, end: int) -> Candidate | None:
    """Code between fences: drop leading blank lines and trailing whitespace, keep first-line indentation."""
    piece = completion[start:end]
    right = len(piece.rstrip())
    first = len(piece) - len(piece.lstrip())
    if right <= first:
        return None
    left = piece.rfind("\n", 0, first) + 1  # start of the first non-blank line
    return Candidate(piece[left:right], start + left, start + right)


def _is_single_line(completion: str) -> bool:
    return "\n" not in completion.strip()


def _list_marker_spans(completion: str, style: str) -> list[tuple[int, int]]:
    """(marker_start, marker_end) of each accepted list marker, in order."""
    if _is_single_line(completion):
        return _inline_marker_spans(completion, style)
    pattern = _NUMBERED_AT_LINE_START if style == "numbered" else _BULLET_AT_LINE_START
    out = []
    for ls, le in _lines(completion):
        m = pattern.match(completion, ls, le)
        if m is not None:
            out.append((m.start(1), m.end()))
    return out


def _inline_marker_spans(completion: str, style: str) -> list[tuple[int, int]]:
    lead = len(completion) - len(completion.lstrip())  # markers "at the start" may follow whitespace
    out: list[tuple[int, int]] = []
    if style == "numbered":
        expected = None  # number the next marker must have
        for m in _NUMBERED_ANYWHERE.finditer(completion):
            num = int(m.group(1))
            ok = (num == 1 or m.start() == lead) if expected is None else num == expected
            if ok:
                out.append((m.start(), m.end()))
                expected = num + 1
        return out
    char = None  # the bullet character of the list
    for m in _BULLET_ANYWHERE.finditer(completion):
        c = m.group(1)
        ok = (m.start() == lead or c == "•") if char is None else c == char
        if ok:
            out.append((m.start(), m.end()))
            char = c
    return out


def _parse_list(completion: str, style: str) -> list[Candidate]:
    markers = _list_marker_spans(completion, style)
    if not markers:
        return []
    if _is_single_line(completion):
        ends = [ms for ms, _ in markers[1:]] + [len(completion)]
        items = [(me, end) for (_, me), end in zip(markers, ends, strict=True)]
    else:
        items = _multiline_items(completion, markers)
    return [c for s, e in items if (c := _tight(completion, s, e)) is not None]


def _multiline_items(completion: str, markers: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each item runs from its marker to the end of its last continuation line (indented, non-blank)."""
    marker_at_line = {completion.rfind("\n", 0, ms) + 1: me for ms, me in markers}
    items: list[tuple[int, int]] = []
    current: list[int] | None = None  # [item_start, item_end] of the open item
    for ls, le in _lines(completion):
        if ls in marker_at_line:
            if current is not None:
                items.append((current[0], current[1]))
            current = [marker_at_line[ls], le]
            continue
        if current is None:
            continue  # preamble
        line = completion[ls:le]
        if line.strip() and line[:1].isspace():
            current[1] = le  # indented continuation line
        else:
            items.append((current[0], current[1]))  # blank line or unindented prose ends the item
            current = None
    if current is not None:
        items.append((current[0], current[1]))
    return items


def _parse_delimited(completion: str, delimiters: str) -> list[Candidate]:
    seps = set(delimiters) | {"\n"}
    out: list[Candidate] = []
    start = 0
    for i, ch in enumerate(completion):
        if ch in seps:
            if (c := _tight(completion, start, i)) is not None:
                out.append(c)
            start = i + 1
    if (c := _tight(completion, start, len(completion))) is not None:
        out.append(c)
    return out


def detect_style(completion: str) -> str:
    """The style ``"auto"`` resolves to: fenced, else numbered, else bullets, else delimited."""
    if any(_FENCE.fullmatch(completion, ls, le) for ls, le in _lines(completion)):
        return "fenced"
    if _list_marker_spans(completion, "numbered"):
        return "numbered"
    if _list_marker_spans(completion, "bullets"):
        return "bullets"
    return "delimited"


def parse_candidates(completion: str, style: str = "auto", delimiters: str = ",;") -> list[Candidate]:
    """Candidates of ``completion`` in order, each with ``completion[c.start:c.end] == c.text``.

    ``style`` is one of ``STYLES`` (see the module docstring for each). ``delimiters`` (characters) is used by
    the ``"delimited"`` style only; newlines always separate delimited candidates. Never raises on malformed
    text: returns whatever it finds, possibly nothing.
    """
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    if style not in STYLES:
        raise ValueError(f"unknown candidate style {style!r}; expected one of {STYLES}")
    if not isinstance(delimiters, str):
        raise ValueError(f"delimiters must be a str of separator characters, got {type(delimiters).__name__}")
    if style == "auto":
        style = detect_style(completion)
    if style == "fenced":
        return _parse_fenced(completion)
    if style in ("numbered", "bullets"):
        return _parse_list(completion, style)
    return _parse_delimited(completion, delimiters)
