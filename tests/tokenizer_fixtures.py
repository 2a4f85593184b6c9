"""Offline tokenizers for tests, built with the `tokenizers` library (nothing is downloaded).

- :func:`byte_level_bpe_tokenizer`: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer + ByteLevel decoder)
  trained on :data:`BPE_CORPUS`, which holds multi-byte unicode (é, 日本, emoji). With ``use_regex=False`` the
  pre-tokenizer does not split at GPT-2's word/punctuation boundaries, so BPE learns merges across candidate
  boundaries such as "1,2" or ", item" (tokens that straddle two candidates).
- :func:`word_level_tokenizer`: a WordLevel tokenizer (whitespace pre-tokenizer, no decoder: decoding joins
  the tokens with spaces), optionally with ``clean_up_tokenization_spaces``.

Both are wrapped as ``transformers.PreTrainedTokenizerFast`` with eos and pad tokens. Builds are cached (the
tokenizers are not mutated by tests).
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"

BPE_CORPUS: list[str] = (
    [
        "1. item_12\n2. item_7\n3. item_3\n",
        "- café au lait\n- naïve résumé\n- crème brûlée\n",
        "日本 日本語 東京 🎉 🚀 ok 👍🏽",
        "item_1, item_2; item_3, item_4",
        "```python\ndef f(x):\n    return x + 1\n```\n",
        "Here are my recommendations: item_5, item_6",
    ]
    * 20
    + ["1,2,3", "1,2", "a,b;c"] * 40  # so that boundary-straddling pieces like "1,2" become single tokens
)


@functools.lru_cache(maxsize=4)
def byte_level_bpe_tokenizer(use_regex: bool = True, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE trained offline on :data:`BPE_CORPUS`; eos and pad are special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(BPE_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


WORDS: list[str] = [
    "1", "2", "3", ".", ")", ",", ";", "-", "*", "item_1", "item_2", "item_3", "item_7", "item_12",
    "Here", "are", "my", "picks", ":", "café", "日本", "🎉", "n't", "'s", "do", "it", "!", "?",
]  # fmt: skip


@functools.lru_cache(maxsize=8)
def word_level_tokenizer(
    pre_tokenizer: str = "whitespace", clean_up_tokenization_spaces: bool = False
) -> PreTrainedTokenizerFast:
    """WordLevel over :data:`WORDS`; ``pre_tokenizer`` is "whitespace" (splits punctuation off words) or
    "whitespace_split" (splits at whitespace only). No decoder, so decode joins tokens with single spaces."""
    vocab = {w: i for i, w in enumerate([UNK, EOS, PAD, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if pre_tokenizer == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    elif pre_tokenizer == "whitespace_split":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        raise ValueError(f"unknown pre_tokenizer {pre_tokenizer!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=clean_up_tokenization_spaces,
    )
