"""Map candidate advantages onto generated tokens (docs/method.md, "Tokens").

TRL's GRPOTrainer (1.16, ``_generate``) turns the generated ids into the completion text with
``processing_class.batch_decode(completion_ids, skip_special_tokens=True)``, and the task parses *that* text
into candidates. So the span of each generated token must be measured in exactly that string, which this
module calls the *decoded completion* (:func:`decode_completion`), and must come from the ids the policy
generated, not from re-tokenising the text (a sampled sequence is often not the canonical tokenisation of
its own text).

:func:`token_char_spans` gives each token a character span ``[start, end)`` in the decoded completion:

- Fast path, byte-level BPE (GPT-2 style, a ``ByteLevel`` decoder): ids -> token strings -> bytes through
  the byte-to-unicode table, byte offsets accumulated, then mapped to character offsets of the UTF-8
  decoding. A token covering any byte of a character covers that character, so when a multi-byte character
  (é, 日, an emoji) is split across tokens, each of those tokens spans it (consecutive spans then overlap by
  that one character). Invalid UTF-8 (e.g. a completion cut inside a character) decodes to U+FFFD as the
  tokenizer does.
- Fast path, no decoder (e.g. a WordLevel tokenizer, whose decode joins tokens with spaces): the joining
  space belongs to the token after it; if ``clean_up_tokenization_spaces`` then deletes spaces (" ," ->
  ","), the surviving characters are aligned to the joined text.
- Fast path, a token-by-token decoder (``Metaspace``, as the project's offline word-level tokenizer uses):
  each token decoded alone, the pieces concatenated (spaces the decoder drops, e.g. a leading one, aligned
  as above).
- General fallback, any tokenizer: decode every prefix of the ids (O(T) decodes) and give token i the
  characters that the prefix ending at i adds to the longest common prefix with the decoded completion. Here
  a character split across tokens belongs to the token that completes it.

Each fast path is checked: its reconstruction must equal ``tokenizer.decode(ids, skip_special_tokens=True)``
and its spans must tile that text (see :func:`_tiles`), else the fallback is used. Tokens removed by
decoding (special tokens such as EOS and pad, with ``skip_special_tokens=True``) get an empty span.

:func:`token_owners` then names, for each token, the one candidate its span overlaps, and -1 when it
overlaps none (preamble, separators, EOS) or several (a BPE token straddling a boundary);
``BatchCredit.token_advantages`` turns owners into advantages, and :func:`token_advantages` is the paper's
plain broadcast (each owned token carries its candidate's advantage, the others the set advantage).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import decoders

from shapegrpo_core.candidates import Candidate

Span = tuple[int, int]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel pre-tokenizers and decoders."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # bytes that are whitespace/control get code points above 255, in order
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _to_id_list(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor | np.ndarray):
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    ids = [int(t) for t in token_ids]
    if ids and min(ids) < 0:  # e.g. -100 label padding: not a token, and the Rust decoder would overflow
        raise ValueError(f"token ids must be non-negative, got {min(ids)}")
    return ids


def decode_completion(token_ids: Sequence[int], tokenizer: Any) -> str:
    """The completion text TRL's GRPOTrainer builds from generated ids; spans are offsets into this string."""
    return tokenizer.decode(_to_id_list(token_ids), skip_special_tokens=True)


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", None)


def _skipped_ids(backend: Any) -> set[int]:
    """Ids the Rust decoder drops with skip_special_tokens=True: added tokens flagged special."""
    return _vocabulary(backend).skipped


class _Vocabulary:
    """Per-backend memo of what each id decodes to on its own: the token-by-token fast paths look pieces up
    here instead of asking the Rust tokenizer once per token per row (the trainer maps every step)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend  # held so that id(backend) cannot be reused while the memo lives
        self.skipped = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self.tokens: dict[int, str | None] = {}
        self.pieces: dict[int, str | None] = {}

    def token(self, i: int) -> str | None:
        if i not in self.tokens:
            self.tokens[i] = None if i in self.skipped else self.backend.id_to_token(i)
        return self.tokens[i]

    def piece(self, i: int) -> str | None:
        if i not in self.pieces:
            tok = self.token(i)
            self.pieces[i] = None if tok is None else self.backend.decoder.decode([tok])
        return self.pieces[i]


_VOCABULARIES: dict[int, _Vocabulary] = {}


def _vocabulary(backend: Any) -> _Vocabulary:
    vocab = _VOCABULARIES.get(id(backend))
    if vocab is None or vocab.backend is not backend:
        if len(_VOCABULARIES) > 8:  # a handful of tokenizers per process; never grow without bound
            _VOCABULARIES.clear()
        vocab = _VOCABULARIES[id(backend)] = _Vocabulary(backend)
    return vocab


def _char_start_flags(data: bytes) -> np.ndarray:
    """(n_bytes,) bool: byte starts a character of ``data.decode("utf-8", "replace")``.

    In valid UTF-8 every non-continuation byte starts a character. Each invalid run (a maximal subpart, as
    Python and Rust's from_utf8_lossy both cut them) becomes one U+FFFD that starts at the run's first byte.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    flags = (arr & 0xC0) != 0x80  # (n_bytes,)
    pos = 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
            break
        except UnicodeDecodeError as err:
            bad_start, bad_end = pos + err.start, pos + err.end
            flags[bad_start] = True
            flags[bad_start + 1 : bad_end] = False
            pos = bad_end
    return flags


def _byte_level_spans(ids: list[int], backend: Any) -> tuple[list[Span], str]:
    """Spans and reconstructed text for a ByteLevel decoder (see module docstring)."""
    skipped = _skipped_ids(backend)
    pieces: list[bytes] = []
    for i in ids:
        tok = None if i in skipped else backend.id_to_token(i)
        if tok is None:  # removed by decoding (special) or unknown to the vocabulary: no bytes
            pieces.append(b"")
            continue
        try:
            pieces.append(bytes(_UNICODE_TO_BYTE[c] for c in tok))
        except KeyError:  # like the Rust decoder: a token with a char outside the table is its raw UTF-8
            pieces.append(tok.encode("utf-8"))
    data = b"".join(pieces)
    text = data.decode("utf-8", errors="replace")
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))  # (T,)
    byte_end = np.cumsum(lengths)  # (T,)
    byte_start = byte_end - lengths  # (T,)
    # chars_before[k] = number of characters that start in data[:k], k = 0..n_bytes.
    chars_before = np.concatenate([[0], np.cumsum(_char_start_flags(data))])  # (n_bytes + 1,)
    nonempty = lengths > 0
    # A token covers the character of its first byte through the character of its last byte.
    start = np.where(
        nonempty, chars_before[np.minimum(byte_start + 1, len(data))] - 1, chars_before[byte_start]
    )
    end = np.where(nonempty, chars_before[byte_end], start)
    return list(zip(start.tolist(), end.tolist(), strict=True)), text


def _pieces_to_spans(pieces: list[tuple[int, str]], num_ids: int, reference: str) -> tuple[list[Span], str]:
    """Spans from (token index, decoded piece) pairs whose concatenation is the decoded text, or that text
    with some spaces deleted (clean_up_tokenization_spaces, a Metaspace dropping its first space)."""
    owner: list[int] = []  # owner[c] = index of the token that character c of the joined text belongs to
    for t, piece in pieces:
        owner.extend([t] * len(piece))
    joined = "".join(piece for _, piece in pieces)
    if joined != reference:
        kept = _deletion_alignment(joined, reference)
        if kept is None:
            return [], joined  # not a pure deletion of characters: let the caller fall back
        owner = [owner[k] for k in kept]
        joined = reference
    # owner is non-decreasing: token t spans the characters it owns (empty where it owns none). Plain Python:
    # completions are short, and this runs for every row of every training step.
    spans: list[Span] = []
    pos, n_chars = 0, len(owner)
    for t in range(num_ids):
        while pos < n_chars and owner[pos] < t:
            pos += 1
        first = pos
        while pos < n_chars and owner[pos] == t:
            pos += 1
        spans.append((first, pos))
    return spans, joined


def _joined_spans(ids: list[int], backend: Any, reference: str) -> tuple[list[Span], str]:
    """Spans for a tokenizer without decoder: decode == " ".join(tokens), maybe with spaces cleaned up."""
    vocab = _vocabulary(backend)
    pieces: list[tuple[int, str]] = []
    for t, i in enumerate(ids):
        tok = vocab.token(i)
        if tok is not None:
            # The joining space belongs to the token after it.
            pieces.append((t, tok if not pieces else " " + tok))
    return _pieces_to_spans(pieces, len(ids), reference)


def _per_token_spans(ids: list[int], backend: Any, reference: str) -> tuple[list[Span], str]:
    """Spans for a decoder that works token by token (e.g. Metaspace, as the project's word-level tokenizer
    uses): decode == the concatenation of each token decoded alone. The caller checks the result."""
    vocab = _vocabulary(backend)
    pieces = [(t, piece) for t, i in enumerate(ids) if (piece := vocab.piece(i)) is not None]
    return _pieces_to_spans(pieces, len(ids), reference)


def _deletion_alignment(source: str, target: str) -> list[int] | None:
    """Indices of ``source`` characters that spell ``target`` when ``target`` is ``source`` with characters
    deleted (what clean_up_tokenization does: " ." -> "."), greedily leftmost; None if it is not."""
    kept: list[int] = []
    j = 0
    for k, ch in enumerate(source):
        if j < len(target) and ch == target[j]:
            kept.append(k)
            j += 1
        elif not ch.isspace():  # cleanup only deletes spaces; anything else means another transformation
            return None
    return kept if j == len(target) else None


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by binary search over C-level slice comparisons."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _prefix_decode_spans(ids: list[int], tokenizer: Any, reference: str) -> list[Span]:
    """General fallback: token i gets what decode(ids[: i + 1]) adds to its common prefix with reference."""
    spans: list[Span] = []
    prev_end = 0
    prev_text: str | None = None
    for t in range(len(ids)):
        prefix_text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if prefix_text == prev_text:  # e.g. a skipped special token: nothing new
            spans.append((prev_end, prev_end))
            continue
        prev_text = prefix_text
        end = max(prev_end, _common_prefix_len(prefix_text, reference))
        spans.append((prev_end, end))
        prev_end = end
    return spans


def _tiles(spans: Sequence[Span], n_chars: int) -> bool:
    """Spans tile a text of ``n_chars`` characters.

    Every span lies in [0, n_chars] with start <= end. The non-empty spans leave no gap and go forward: the
    first starts at 0, each starts at the previous one's end or one character before it (a character split
    across tokens), and the last ends at n_chars (so their starts and ends are non-decreasing). Empty spans
    (tokens that decode to nothing) may sit anywhere in bounds: one between the bytes of a split character
    cannot be ordered against both neighbours. An empty text has only empty spans.
    """
    if any(a < 0 or b > n_chars or a > b for a, b in spans):
        return False
    nonempty = [(a, b) for a, b in spans if b > a]
    if not nonempty:
        return n_chars == 0
    if nonempty[0][0] != 0 or nonempty[-1][1] != n_chars:
        return False
    # Each non-empty span starts at the previous one's end (adjacent) or one before (a split character).
    return all(b[0] - a[1] in (0, -1) for a, b in itertools.pairwise(nonempty))


def token_spans_and_text(token_ids: Sequence[int], tokenizer: Any) -> tuple[list[Span], str]:
    """:func:`token_char_spans` together with the decoded completion the spans point into."""
    ids = _to_id_list(token_ids)
    reference = tokenizer.decode(ids, skip_special_tokens=True)
    backend = _backend(tokenizer)
    decoder = backend.decoder if backend is not None else None
    spans: list[Span] = []
    if backend is not None and isinstance(decoder, decoders.ByteLevel):
        spans, text = _byte_level_spans(ids, backend)
        if text != reference:  # e.g. a post-decode cleanup changed the string: use the general method
            spans = []
    elif backend is not None and decoder is None:
        spans, text = _joined_spans(ids, backend, reference)
        if text != reference:
            spans = []
    elif backend is not None and isinstance(decoder, decoders.Metaspace):
        spans, text = _per_token_spans(ids, backend, reference)
        if text != reference:
            spans = []
    if (spans or not ids) and _tiles(spans, len(reference)):
        return spans, reference
    spans = _prefix_decode_spans(ids, tokenizer, reference)
    if not _tiles(spans, len(reference)):
        raise AssertionError(
            f"token spans do not tile the decoded completion ({len(reference)} chars): {spans}"
        )
    return spans, reference


def token_char_spans(token_ids: Sequence[int], tokenizer: Any) -> list[Span]:
    """Character span [start, end) of each generated token in ``decode_completion(token_ids, tokenizer)``.

    ``token_ids`` are the generated ids (EOS and padding may be included: removed by decoding, they get empty
    spans). Works for any tokenizer with ``decode``; fast for byte-level BPE and decoder-less (WordLevel) fast
    tokenizers (module docstring).
    """
    return token_spans_and_text(token_ids, tokenizer)[0]


def _as_float_array(x: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _row_owners(spans: Sequence[Span], cands: Sequence[Candidate]) -> list[int]:
    """Index of the one candidate each token's span overlaps, -1 for none or several."""
    real = sorted((c.start, c.end, k) for k, c in enumerate(cands) if c.end > c.start)
    c_start = [r[0] for r in real]
    c_end = [r[1] for r in real]
    if any(nxt < end for nxt, end in zip(c_start[1:], c_end[:-1], strict=True)):
        raise ValueError("candidate spans overlap; parse_candidates never returns overlapping candidates")
    out = [-1] * len(spans)
    if not real:
        return out
    for t, (s, e) in enumerate(spans):
        # Candidates overlapping [s, e), e > s: c_end > s (from lo on) and c_start < e (before hi); c_end is
        # sorted too because the spans are disjoint.
        lo = bisect.bisect_right(c_end, s)
        if e > s and bisect.bisect_left(c_start, e) - lo == 1:
            out[t] = real[lo][2]
    return out


def token_owners(
    completion_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    candidates: Sequence[Sequence[Candidate]],
    max_len: int | None = None,
) -> np.ndarray:
    """(N, T) int64: for each token, the index of the candidate its span overlaps alone, else -1 (also past
    a completion's length). candidates[n] must be parsed from ``decode_completion(completion_ids[n],
    tokenizer)``; a candidate that does not match that text raises ValueError."""
    if len(candidates) != len(completion_ids):
        raise ValueError(f"{len(completion_ids)} completions but {len(candidates)} candidate lists")
    id_lists = [_to_id_list(ids) for ids in completion_ids]
    longest = max((len(ids) for ids in id_lists), default=0)
    width = longest if max_len is None else max_len
    if width < longest:
        raise ValueError(f"max_len={max_len} is shorter than the longest completion ({longest} tokens)")
    out = np.full((len(id_lists), width), -1, dtype=np.int64)  # (N, T)
    for n, ids in enumerate(id_lists):
        if not candidates[n]:
            continue  # nothing to own: skip decoding altogether
        spans, text = token_spans_and_text(ids, tokenizer)
        for c in candidates[n]:
            if text[c.start : c.end] != c.text:
                raise ValueError(
                    f"row {n}: candidate {c.text!r} at [{c.start}, {c.end}) is not in the decoded "
                    "completion; parse the text from decode_completion(ids, tokenizer)"
                )
        out[n, : len(ids)] = _row_owners(spans, candidates[n])
    return out


def token_advantages(
    completion_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    candidates: Sequence[Sequence[Candidate]],
    candidate_adv: np.ndarray | torch.Tensor,
    set_adv: np.ndarray | torch.Tensor,
    max_len: int | None = None,
) -> torch.Tensor:
    """(N, T) float32 per-token advantages for N completions (T = ``max_len`` or the longest completion).

    A token whose span overlaps exactly one candidate's span gets that candidate's advantage; tokens that
    overlap none or several candidates (preamble, separators, EOS/pad, a token straddling a boundary) get the
    row's set advantage, and so do tokens of candidates beyond the K columns of ``candidate_adv`` or with a
    NaN advantage (masked). Positions past a completion's length are 0.

    candidates[n] must be parsed from ``decode_completion(completion_ids[n], tokenizer)`` (the text TRL gives
    reward functions); a candidate that does not match that text raises ValueError.
    candidate_adv: (N, K), NaN allowed. set_adv: (N,), finite.
    """
    n_rows = len(completion_ids)
    cand_adv = _as_float_array(candidate_adv, "candidate_adv", 2)  # (N, K)
    row_adv = _as_float_array(set_adv, "set_adv", 1)  # (N,)
    if len(candidates) != n_rows or cand_adv.shape[0] != n_rows or row_adv.shape[0] != n_rows:
        raise ValueError(
            f"batch sizes differ: {n_rows} completions, {len(candidates)} candidate lists, "
            f"candidate_adv {cand_adv.shape}, set_adv {row_adv.shape}"
        )
    if not np.isfinite(row_adv).all():
        raise ValueError("set_adv must be finite (a NaN set reward should already have advantage 0)")
    if np.isinf(cand_adv).any():
        raise ValueError("candidate_adv must not contain inf (NaN marks a masked candidate)")
    owners = token_owners(completion_ids, tokenizer, candidates, max_len)  # (N, T)
    lengths = np.array([len(_to_id_list(ids)) for ids in completion_ids])
    inside = np.arange(owners.shape[1])[None, :] < lengths[:, None]  # (N, T)
    k = cand_adv.shape[1]
    # Candidates beyond the K columns, or with a NaN advantage (masked), fall back to the set advantage.
    padded = np.concatenate([cand_adv, np.full((n_rows, 1), np.nan)], axis=1)  # (N, K + 1)
    picked = padded[np.arange(n_rows)[:, None], np.where((owners >= 0) & (owners < k), owners, k)]
    out = np.where(np.isnan(picked), row_adv[:, None], picked)
    out = np.where(inside, out, 0.0).astype(np.float32)  # (N, T), padding stays 0
    return torch.from_numpy(out)
