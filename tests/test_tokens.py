"""Token spans in the decoded completion and per-token advantages (shapegrpo_core/tokens.py).

Tokenizers are real `tokenizers` models trained/built offline (tests/tokenizer_fixtures.py).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import BPE_CORPUS, byte_level_bpe_tokenizer, word_level_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.tokens import (
    _byte_level_spans,
    _joined_spans,
    _prefix_decode_spans,
    _tiles,
    decode_completion,
    token_advantages,
    token_char_spans,
    token_spans_and_text,
)

SET = -7.0  # a set advantage no candidate uses, so tests can tell them apart


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def oracle_advantages(spans, cands: list[Candidate], cand_adv: list[float], set_adv: float) -> list[float]:
    """Brute-force definition: one overlapped candidate with a usable advantage -> it, else the set's."""
    out = []
    for s, e in spans:
        hit = [k for k, c in enumerate(cands) if s < c.end and c.start < e]
        if len(hit) == 1 and hit[0] < len(cand_adv) and not math.isnan(cand_adv[hit[0]]):
            out.append(cand_adv[hit[0]])
        else:
            out.append(set_adv)
    return out


# ---------------------------------------------------------------- spans: byte-level BPE


def test_decode_completion_is_trls_batch_decode() -> None:
    tok = byte_level_bpe_tokenizer()
    rows = [[*encode(tok, "1. café\n2. 日本"), tok.eos_token_id], [tok.pad_token_id], []]
    # TRL 1.16 GRPOTrainer._generate: processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    assert tok.batch_decode(rows, skip_special_tokens=True) == [decode_completion(r, tok) for r in rows]


@pytest.mark.parametrize("use_regex", [True, False])
def test_byte_level_canonical_spans_are_the_tokens_text(use_regex: bool) -> None:
    tok = byte_level_bpe_tokenizer(use_regex=use_regex)
    text = "1. café 🎉\n2. 日本, item_1; naïve 👍🏽"
    ids = encode(tok, text)
    spans, decoded = token_spans_and_text(ids, tok)
    assert decoded == text and _tiles(spans, len(text))
    assert _byte_level_spans(ids, tok.backend_tokenizer) == (spans, text)  # the fast path was used
    for i, (s, e) in zip(ids, spans, strict=True):
        piece = tok.decode([i])
        if "\ufffd" not in piece:  # whole characters: the span is exactly the token's text
            assert text[s:e] == piece


def test_multibyte_character_split_across_tokens_is_covered_by_each() -> None:
    tok = byte_level_bpe_tokenizer()
    # One token per byte (the byte alphabet is in the vocabulary): 🎉 is 4 tokens, é is 2.
    byte_ids = [tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(encode(tok, ch))[0]) for ch in "ab"]
    emoji = [tok.backend_tokenizer.token_to_id(c) for c in tok.convert_ids_to_tokens(encode(tok, "🎉"))]
    ids = byte_ids[:1] + [tok.backend_tokenizer.token_to_id(b) for b in ["Ã", "©"]] + byte_ids[1:]
    text = decode_completion(ids, tok)
    assert text == "aéb"
    assert token_char_spans(ids, tok) == [(0, 1), (1, 2), (1, 2), (2, 3)]
    emoji_bytes = [tok.backend_tokenizer.token_to_id(t) for t in ["ð", "Ł", "İ", "ī"]]
    assert decode_completion(emoji_bytes, tok) == "🎉"
    assert token_char_spans(emoji_bytes, tok) == [(0, 1)] * 4
    assert len(emoji) >= 1


def test_truncated_inside_a_character_decodes_to_replacement_char() -> None:
    tok = byte_level_bpe_tokenizer()
    bt = tok.backend_tokenizer
    ids = [*encode(tok, "ok "), bt.token_to_id("æ"), bt.token_to_id("Ĺ")]  # first 2 of 3 bytes of 日
    spans, text = token_spans_and_text(ids, tok)
    assert text == "ok \ufffd"
    assert spans[-2:] == [(3, 4), (3, 4)]
    assert _byte_level_spans(ids, bt)[1] == text  # handled by the fast path, no fallback needed


def test_special_tokens_get_empty_spans() -> None:
    tok = byte_level_bpe_tokenizer()
    ids = [tok.pad_token_id, *encode(tok, "1. a"), tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    spans = token_char_spans(ids, tok)
    assert spans[0] == (0, 0) and spans[-3:] == [(4, 4)] * 3


def test_special_token_inside_a_split_character() -> None:
    tok = byte_level_bpe_tokenizer()
    bt = tok.backend_tokenizer
    ids = [bt.token_to_id("Â"), tok.eos_token_id, bt.token_to_id("¡")]  # bytes C2 | EOS | A1 = "¡"
    spans, text = token_spans_and_text(ids, tok)
    assert text == "¡" and spans[0] == spans[2] == (0, 1) and spans[1][0] == spans[1][1]
    cands = [Candidate("¡", 0, 1)]
    assert token_advantages([ids], tok, [cands], np.array([[2.0]]), np.array([SET]))[0].tolist() == [
        2.0,
        SET,
        2.0,
    ]


def test_empty_completion() -> None:
    tok = byte_level_bpe_tokenizer()
    assert token_char_spans([], tok) == []
    assert token_char_spans([tok.eos_token_id], tok) == [(0, 0)]


def test_bpe_with_post_decode_cleanup_falls_back_to_prefix_decoding() -> None:
    # Forcing transformers' space cleanup on a BPE tokenizer changes the decoded string after the Rust
    # decoder, so the byte reconstruction no longer matches it and the general method must take over.
    base = byte_level_bpe_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),  # a copy: fixtures are cached
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    ids = encode(tok, "a , b ; c .")
    spans, text = token_spans_and_text(ids, tok)
    assert text == "a, b ; c."  # " ," and " ." are cleaned up, " ;" is not
    assert _byte_level_spans(ids, tok.backend_tokenizer)[1] != text
    assert spans == _prefix_decode_spans(ids, tok, text) and _tiles(spans, len(text))
    cands = parse_candidates(text, "delimited")
    assert [c.text for c in cands] == ["a", "b", "c."]


_BYTE_LEVEL = byte_level_bpe_tokenizer(use_regex=False)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, _BYTE_LEVEL.backend_tokenizer.get_vocab_size() - 1), max_size=40))
def test_random_byte_level_id_sequences_tile_the_decoded_text(ids: list[int]) -> None:
    # Sampled ids need not be a canonical tokenisation; they may split characters or be invalid UTF-8.
    tok = _BYTE_LEVEL
    spans, text = token_spans_and_text(ids, tok)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert _tiles(spans, len(text))
    assert _byte_level_spans(ids, tok.backend_tokenizer) == (spans, text)  # no fallback needed


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from([*"abc ,;.\n1é日🎉", "item_1", "1,2", "日本"]), max_size=30))
def test_fast_path_equals_prefix_decoding_when_no_character_is_split(pieces: list[str]) -> None:
    tok = _BYTE_LEVEL
    ids = [i for p in pieces for i in encode(tok, p)]  # non-canonical: each piece encoded on its own
    spans, text = token_spans_and_text(ids, tok)
    assert text == "".join(pieces)
    if all("\ufffd" not in tok.decode([i]) for i in ids):
        assert spans == _prefix_decode_spans(ids, tok, text)


# ---------------------------------------------------------------- spans: word level and other decoders


@pytest.mark.parametrize("pre", ["whitespace", "whitespace_split"])
@pytest.mark.parametrize("clean_up", [False, True])
def test_word_level_spans_match_the_spaced_decoding(pre: str, clean_up: bool) -> None:
    tok = word_level_tokenizer(pre, clean_up)
    # The Whitespace pre-tokenizer splits "n't" into unknown pieces, so only WhitespaceSplit gets it.
    raw = (
        "1 . item_12 2 . item_7 do n't , it 's !"
        if pre == "whitespace_split"
        else "1 . item_12 2 . item_7 , it !"
    )
    ids = [*encode(tok, raw), tok.eos_token_id]
    spans, text = token_spans_and_text(ids, tok)
    cleaned = {
        "whitespace_split": "1. item_12 2. item_7 don't, it's!",
        "whitespace": "1. item_12 2. item_7, it!",
    }
    assert text == (cleaned[pre] if clean_up else raw)
    assert _joined_spans(ids, tok.backend_tokenizer, text) == (spans, text)  # fast path used
    assert spans == _prefix_decode_spans(ids, tok, text)  # and it agrees with the general method
    for i, (s, e) in zip(ids, spans, strict=True):
        if i != tok.eos_token_id:
            assert text[s:e].strip() == tok.convert_ids_to_tokens(i)  # each token's word (+ leading space)


def test_word_level_unknown_words_are_skipped_special_tokens() -> None:
    tok = word_level_tokenizer("whitespace_split")
    ids = encode(tok, "item_1 zebra item_2")  # zebra -> <unk>, which decoding skips
    spans, text = token_spans_and_text(ids, tok)
    assert text == "item_1 item_2" and spans == [(0, 6), (6, 6), (6, 13)]


def test_other_decoders_use_the_general_fallback() -> None:
    vocab = {
        w: i for i, w in enumerate(["[UNK]", "[EOS]", "item", "##_1", "##_2", ",", "caf", "##é", "日本"])
    }
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # glues "##" pieces, cleans " ," itself
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    ids = [*encode(tok, "item_1 , café 日本 , item_2"), tok.eos_token_id]
    spans, text = token_spans_and_text(ids, tok)
    assert text == "item_1, café 日本, item_2"
    assert _tiles(spans, len(text)) and spans[-1] == (len(text), len(text))
    cands = parse_candidates(text)
    adv = token_advantages([ids], tok, [cands], np.array([[1.0, 2.0, 3.0]]), np.array([SET]))
    assert adv[0].tolist() == oracle_advantages(spans, cands, [1.0, 2.0, 3.0], SET)
    assert adv[0, 1].item() == 1.0  # "##_1" continues "item_1"


# ---------------------------------------------------------------- advantages


def test_straddling_token_gets_the_set_advantage() -> None:
    tok = byte_level_bpe_tokenizer(use_regex=False)  # BPE merged across "," in training: "1,2,3" is one token
    text = "1,2,3; a,b;c ; x"
    ids = [*encode(tok, text), tok.eos_token_id]
    spans, decoded = token_spans_and_text(ids, tok)
    assert decoded == text
    cands = parse_candidates(text, "delimited")
    assert [c.text for c in cands] == ["1", "2", "3", "a", "b", "c", "x"]
    cand_adv = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    adv = token_advantages([ids], tok, [cands], np.array([cand_adv]), np.array([SET]))[0].tolist()
    pieces = [text[s:e] for s, e in spans]
    assert "1,2,3" in pieces and "a,b;c" in pieces  # the deliberately merged, straddling tokens
    assert adv[pieces.index("1,2,3")] == SET and adv[pieces.index("a,b;c")] == SET
    assert adv[-1] == SET  # EOS
    assert adv == oracle_advantages(spans, cands, cand_adv, SET)
    assert 7.0 in adv  # "x" got its own advantage


def test_boundary_piece_with_one_candidate_gets_that_candidate() -> None:
    # ", item_" holds a separator and the start of one candidate: it overlaps only that candidate.
    tok = byte_level_bpe_tokenizer(use_regex=False)
    text = "item_1, item_2"
    ids = encode(tok, text)
    spans = token_char_spans(ids, tok)
    cands = parse_candidates(text)
    adv = token_advantages([ids], tok, [cands], np.array([[1.0, 2.0]]), np.array([SET]))[0].tolist()
    for (s, e), a in zip(spans, adv, strict=True):
        if ", item" in text[s:e]:
            assert a == 2.0
    assert adv == oracle_advantages(spans, cands, [1.0, 2.0], SET)


def test_word_level_advantages_eos_pad_and_padding() -> None:
    tok = word_level_tokenizer("whitespace", clean_up_tokenization_spaces=False)
    rows = [
        [*encode(tok, "Here are my picks : 1 . item_12 2 . item_7"), tok.eos_token_id],
        [*encode(tok, "item_3 , item_1"), tok.eos_token_id, tok.pad_token_id],
    ]
    completions = [decode_completion(r, tok) for r in rows]
    assert completions == ["Here are my picks : 1 . item_12 2 . item_7", "item_3 , item_1"]
    cands = [parse_candidates(c) for c in completions]
    assert [[c.text for c in cs] for cs in cands] == [["item_12", "item_7"], ["item_3", "item_1"]]
    cand_adv = np.array([[0.5, -0.5], [1.5, np.nan]])
    adv = token_advantages(rows, tok, cands, cand_adv, np.array([0.25, -1.0]), max_len=16)
    assert adv.dtype == torch.float32 and adv.shape == (2, 16)
    r0 = [0.25] * 5 + [0.25, 0.25, 0.5, 0.25, 0.25, -0.5, 0.25] + [0.0] * 4  # preamble, markers, EOS: set
    r1 = [1.5, -1.0, -1.0, -1.0, -1.0] + [0.0] * 11  # NaN candidate -> set; EOS, pad -> set; padding -> 0
    assert adv.tolist() == [r0, r1]


def test_candidates_beyond_k_and_nan_get_the_set_advantage() -> None:
    tok = byte_level_bpe_tokenizer()
    text = "- a\n- b\n- c\n- d"
    ids = encode(tok, text)
    cands = parse_candidates(text)
    cand_adv = torch.tensor([[1.0, float("nan")]])  # K = 2 columns; b masked; c, d beyond K
    adv = token_advantages([ids], tok, [cands], cand_adv, torch.tensor([SET]))[0].tolist()
    spans = token_char_spans(ids, tok)
    assert adv == oracle_advantages(spans, cands, [1.0, float("nan")], SET)
    assert sorted(set(adv)) == [SET, 1.0]


def test_no_candidates_gives_set_advantage_everywhere() -> None:
    tok = byte_level_bpe_tokenizer()
    ids = encode(tok, "no list here")
    adv = token_advantages([ids, []], tok, [[], []], np.zeros((2, 0)), np.array([SET, 1.0]))
    assert adv.shape == (2, len(ids))
    assert adv[0].tolist() == [SET] * len(ids) and adv[1].tolist() == [0.0] * len(ids)


def test_token_advantages_validation() -> None:
    tok = byte_level_bpe_tokenizer()
    ids = encode(tok, "a, b")
    cands = parse_candidates("a, b")
    ok = {"candidate_adv": np.ones((1, 2)), "set_adv": np.zeros(1)}
    with pytest.raises(ValueError, match="batch sizes"):
        token_advantages([ids], tok, [cands, cands], **ok)
    with pytest.raises(ValueError, match="finite"):
        token_advantages([ids], tok, [cands], np.ones((1, 2)), np.array([np.nan]))
    with pytest.raises(ValueError, match="inf"):
        token_advantages([ids], tok, [cands], np.array([[np.inf, 0.0]]), np.zeros(1))
    with pytest.raises(ValueError, match="max_len"):
        token_advantages([ids], tok, [cands], max_len=1, **ok)
    with pytest.raises(ValueError, match="decoded completion"):
        token_advantages([ids], tok, [parse_candidates("x, a, b")], **ok)
    with pytest.raises(ValueError, match="overlap"):
        token_advantages([ids], tok, [[Candidate("a, b", 0, 4), Candidate("b", 3, 4)]], **ok)
    with pytest.raises(ValueError, match="2-D"):
        token_advantages([ids], tok, [cands], np.ones(2), np.zeros(1))


_STYLES = ["numbered", "bullets", "delimited", "fenced"]
_items = st.lists(
    st.text(alphabet="abxyz19_é日🎉", min_size=1, max_size=8), min_size=0, max_size=6
)  # no separators or markers inside


def _render(style: str, items: list[str]) -> str:
    if style == "numbered":
        return "Picks:\n" + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items))
    if style == "bullets":
        return "\n".join(f"- {t}" for t in items)
    if style == "delimited":
        return ", ".join(items)
    return "".join(f"```py\n{t}\n```\n" for t in items)


@settings(max_examples=80, deadline=None)
@given(
    style=st.sampled_from(_STYLES),
    items=_items,
    cuts=st.lists(st.integers(0, 200), max_size=6),
    which=st.sampled_from(["bpe", "bpe_noregex"]),
    k=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_advantages_match_the_brute_force_definition(
    style: str, items: list[str], cuts: list[int], which: str, k: int, seed: int
) -> None:
    tok = byte_level_bpe_tokenizer(use_regex=which == "bpe")
    text = _render(style, items)
    # Non-canonical ids: encode pieces cut at random character positions, then append EOS.
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    ids = [i for a, b in itertools.pairwise(bounds) for i in encode(tok, text[a:b])]
    ids.append(tok.eos_token_id)
    spans, decoded = token_spans_and_text(ids, tok)
    assert decoded == text
    cands = parse_candidates(decoded, style)
    assert [c.text for c in cands] == items
    rng = np.random.default_rng(seed)
    cand_adv = rng.normal(size=(1, k))
    cand_adv[rng.random((1, k)) < 0.2] = np.nan
    adv = token_advantages([ids], tok, [cands], cand_adv, np.array([SET]), max_len=len(ids) + 3)
    expected = oracle_advantages(spans, cands, cand_adv[0].tolist(), SET) + [0.0] * 3
    np.testing.assert_allclose(adv[0].numpy(), np.array(expected, dtype=np.float32))


def test_corpus_round_trips_through_both_byte_level_tokenizers() -> None:
    for use_regex in (True, False):
        tok = byte_level_bpe_tokenizer(use_regex=use_regex)
        for text in sorted(set(BPE_CORPUS)):
            ids = encode(tok, text)
            spans, decoded = token_spans_and_text(ids, tok)
            assert decoded == text and _tiles(spans, len(text))


def test_metaspace_fast_path_matches_prefix_decoding() -> None:
    """The project's own word-level tokenizer (a Metaspace decoder) takes the per-token fast path, and its
    spans equal the general prefix-decoding method's, special tokens and newlines included."""
    from shapegrpo_core.policy import build_tokenizer
    from shapegrpo_core.tasks.recsys import RecsysTask
    from shapegrpo_core.tokens import _per_token_spans, _prefix_decode_spans

    task = RecsysTask(num_items=20, num_genres=4, num_train_users=4, num_eval_users=2)
    tok = build_tokenizer(task)
    for text in [" i3, i17, i4, i8", " i5,i9 ;\n i2", "history: i1 i2 -> recommend 4:", ""]:
        ids = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        spans, decoded = token_spans_and_text(ids, tok)
        assert decoded == tok.decode(ids, skip_special_tokens=True)
        fast, fast_text = _per_token_spans(ids, tok.backend_tokenizer, decoded)
        assert fast_text == decoded and fast == spans
        assert spans == _prefix_decode_spans(ids, tok, decoded)
