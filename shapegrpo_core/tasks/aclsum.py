"""The ``aclsum`` task: K one-sentence summaries of an ACL paper, scored against its three aspect references.

Data. ACLSum (Takeshita et al., NAACL 2024), shipped by the ``aclsum`` package (MIT): train 100, val 50 and
test 100 papers; per paper a reference summary for each aspect -- challenge, approach, outcome -- and the
sentences of the abstract, introduction and conclusion. Nothing is downloaded. The task's "train" split is
the package's train split; "eval" is ``eval_split`` ("val" by default); "val" and "test" can be asked for by
name.

Prompt. The title and the source text: the sentences of ``sections`` (the abstract by default) in order,
as many as fit in ``max_source_words`` words (at least the first sentence; SmolLM2's tokenizer makes about
1.3 tokens of an English word), asking for K different one-sentence summaries as a numbered list. The prompt
is a plain string; a chat model gets it as a user turn through its chat template (``policy.format_dataset``).

Candidates. The items of a numbered list (``1.`` / ``1)``), else of a bulleted one. Anything else (prose, an
empty answer, unicode noise) parses to no candidate: set utility 0, a recorded zero, never an error.

Game (facility location over the aspects). s_ak = sim(reference of aspect a, candidate k) and

    U(S) = (1/3) · sum_a max_{k in S} s_ak,        u0 = 0,

so each aspect counts once, by its best candidate, and Shapley credit is closed-form (a sum-of-max game):
a candidate that is the only good summary of an aspect keeps that aspect's value, two that cover the same
aspect share it, and one that covers nothing gets 0. ``sim`` is the scorer: ``"rouge1"`` F1 (default;
``rouge-score``, stemmed), ``"rouge2"`` or ``"rougeL"`` F1, a callable ``(references, candidates) -> (3, K)``
array, or ``"module:function"`` naming such a callable (so it survives the pipeline's JSON task manifest).
The paper scored with an LLM judge; plug one in the same way.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.games import Game, SumOfMaxGame
from shapegrpo_core.tasks.base import Task

ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
PACKAGE_SPLITS = ("train", "val", "test")
SPLITS = ("train", "eval", "val", "test")
ROUGE_SCORERS = ("rouge1", "rouge2", "rougeL")
PROMPT_TEMPLATE = (
    "Write {k} different one-sentence summaries of the paper below, as a numbered list (1., 2., ...). "
    "Together they should say what problem the paper addresses, how it addresses it, and what it finds."
    "\n\nTitle: {title}\n\n{source}"
)
Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]

# ACLSum sentences are tokenised ("extraction , and ( QA ) ."): glue punctuation back for the prompt.
_SPACE_BEFORE = re.compile(r"\s+([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")


def detokenize(sentence: str) -> str:
    """A tokenised ACLSum sentence as plain text: no spaces before closing punctuation or after opening."""
    text = " ".join(sentence.split())
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def load_split(split: str) -> list[Any]:
    """The ``aclsum`` package's documents of one of its splits (train, val, test)."""
    if split not in PACKAGE_SPLITS:
        raise ValueError(f"unknown ACLSum split {split!r}; the package has {PACKAGE_SPLITS}")
    from aclsum import ACLSum

    return list(ACLSum(split))


class RougeF1:
    """sim = ROUGE-N/L F1 (``rouge-score``), a (T, K) matrix of references x candidates in [0, 1]."""

    def __init__(self, rouge_type: str = "rouge1", use_stemmer: bool = True) -> None:
        if rouge_type not in ROUGE_SCORERS:
            raise ValueError(f"unknown ROUGE scorer {rouge_type!r}; expected one of {ROUGE_SCORERS}")
        from rouge_score import rouge_scorer

        self.rouge_type = rouge_type
        self._scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)

    def __call__(self, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(references), len(candidates)))
        for t, ref in enumerate(references):
            for k, cand in enumerate(candidates):
                out[t, k] = self._scorer.score(ref, cand)[self.rouge_type].fmeasure
        return out


def resolve_scorer(scorer: str | Scorer, use_stemmer: bool = True) -> Scorer:
    """A scorer from its name ("rouge1", "rouge2", "rougeL"), a "module:function" path, or a callable."""
    if callable(scorer):
        return scorer
    if not isinstance(scorer, str):
        raise ValueError(
            f"scorer must be a name, 'module:function' or a callable, got {type(scorer).__name__}"
        )
    if scorer in ROUGE_SCORERS:
        return RougeF1(scorer, use_stemmer)
    if ":" in scorer:
        module, _, attr = scorer.partition(":")
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise ValueError(f"scorer {scorer!r}: {module} has no callable {attr!r}")
        return fn
    raise ValueError(f"unknown scorer {scorer!r}; use one of {ROUGE_SCORERS} or 'module:function'")


class ACLSumTask(Task):
    """K summaries of an ACLSum paper; facility location over its three aspect references (module doc)."""

    name = "aclsum"

    def __init__(
        self,
        num_candidates: int = 3,
        sections: Sequence[str] = ("abstract",),
        max_source_words: int = 200,
        scorer: str | Scorer = "rouge1",
        use_stemmer: bool = True,
        eval_split: str = "val",
        max_papers: int | None = None,
    ) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        sections = tuple(sections)
        if not sections or any(s not in SECTIONS for s in sections):
            raise ValueError(f"sections must be a non-empty subset of {SECTIONS}, got {sections}")
        if max_source_words < 1:
            raise ValueError(f"max_source_words must be >= 1, got {max_source_words}")
        if eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
        if max_papers is not None and max_papers < 1:
            raise ValueError(f"max_papers must be >= 1 (or None), got {max_papers}")
        self.num_candidates = num_candidates
        self.sections = sections
        self.max_source_words = max_source_words
        self.scorer_name = scorer if isinstance(scorer, str) else getattr(scorer, "__name__", repr(scorer))
        self.scorer = resolve_scorer(scorer, use_stemmer)
        self.eval_split = eval_split
        self.max_papers = max_papers
        self._papers: dict[str, list[dict[str, Any]]] = {}

    # ---- data

    def package_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.eval_split if split == "eval" else split

    def source_text(self, doc: Any) -> str:
        """The sentences of ``sections`` in order, while they fit in ``max_source_words`` (at least one)."""
        kept: list[str] = []
        words = 0
        for sentence in (detokenize(s) for section in self.sections for s in doc.sentences[section]):
            n = len(sentence.split())
            if kept and words + n > self.max_source_words:
                break
            kept.append(sentence)
            words += n
        return " ".join(kept)

    def papers(self, split: str) -> list[dict[str, Any]]:
        """One record per paper of ``split``: id, title, source (the prompt's text), references by aspect."""
        name = self.package_split(split)
        if name not in self._papers:
            docs = load_split(name)[: self.max_papers]
            self._papers[name] = [
                {
                    "id": doc.id,
                    "title": " ".join(doc.title.split()),
                    "source": self.source_text(doc),
                    "references": [" ".join(doc.summaries[a].split()) for a in ASPECTS],
                }
                for doc in docs
            ]
        return self._papers[name]

    def format_prompt(self, title: str, source: str) -> str:
        return PROMPT_TEMPLATE.format(k=self.num_candidates, title=title, source=source)

    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        rows = [
            {
                "prompt": self.format_prompt(p["title"], p["source"]),
                "id": p["id"],
                "title": p["title"],
                "source": p["source"],
                "references": list(p["references"]),
            }
            for p in self.papers(split)
        ]
        random.Random(seed).shuffle(rows)
        return datasets.Dataset.from_list(rows)

    # ---- candidates and games

    def parse(self, completion: str) -> list[Candidate]:
        return parse_candidates(completion, style="numbered") or parse_candidates(completion, style="bullets")

    def similarity(self, references: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
        """(T, K) scorer output, checked: the right shape and finite (a broken scorer is a ValueError that the
        trainer records as a NaN set, never a silent number)."""
        scores = np.asarray(self.scorer(list(references), list(summaries)), dtype=np.float64)
        if scores.shape != (len(references), len(summaries)):
            raise ValueError(
                f"scorer {self.scorer_name!r} returned shape {scores.shape}, expected "
                f"({len(references)}, {len(summaries)})"
            )
        if not np.isfinite(scores).all():
            raise ValueError(f"scorer {self.scorer_name!r} returned a non-finite similarity")
        return scores

    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        refs = list(example["references"])
        if len(refs) != len(ASPECTS) or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(
                f"example {example.get('id')!r} needs one non-empty reference per aspect {ASPECTS}"
            )
        scores = self.similarity(refs, [c.text for c in candidates])  # (3, K)
        return SumOfMaxGame(scores, weights=np.full(len(refs), 1.0 / len(refs)))

    # ---- warm start and tokenizer

    def demonstration_completion(self, source: str) -> str | None:
        """The source's first K distinct sentences as a numbered list, one per line (a format demonstration,
        extractive, not tuned to the references); None when it has fewer than K sentences."""
        from shapegrpo_core.tasks.summarize import split_sentences

        sentences = list(dict.fromkeys(split_sentences(source)))[: self.num_candidates]
        if len(sentences) < self.num_candidates:
            return None
        return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))

    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        pool = [
            (self.format_prompt(p["title"], p["source"]), c)
            for p in self.papers("train")
            if (c := self.demonstration_completion(p["source"])) is not None
        ]
        if not pool:
            raise ValueError(f"no training paper has {self.num_candidates} sentences to demonstrate with")
        rng = random.Random(seed)
        order = [rng.randrange(len(pool)) for _ in range(num)]
        return datasets.Dataset.from_list([{"prompt": pool[i][0], "completion": pool[i][1]} for i in order])

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated word of the prompts and references, plus ``1.`` .. ``K.``."""
        words = {f"{i}." for i in range(1, self.num_candidates + 1)}
        for split in ("train", "eval"):
            for p in self.papers(split):
                words.update(self.format_prompt(p["title"], p["source"]).split())
                words.update(w for r in p["references"] for w in r.split())
        return sorted(words)


__all__ = [
    "ASPECTS",
    "PROMPT_TEMPLATE",
    "ROUGE_SCORERS",
    "SECTIONS",
    "ACLSumTask",
    "RougeF1",
    "detokenize",
    "load_split",
    "resolve_scorer",
]
