"""The ``summarize`` task: K alternative one-sentence summaries of a document, scored by facility location.

Data. Local JSONL files, one document per line: ``{"id", "document": str, "reference": str | [str]}``; a
string reference is split into sentences. The package ships a small fixture of short original documents
(``fixtures/summarize_tiny.jsonl``, 16 documents) used by default and by the tests. Either one file is
split (every ``eval_every``-th document, in file order, is held out for "eval") or ``eval_path`` names the
eval file.

Prompt and candidates. One line (the offline word-level tokenizer cannot hold newlines)::

    Summarize the document in 3 different one-sentence summaries, as a numbered list. Document: ... Summaries:

and the completion is a numbered list, on one line (`` 1. ... 2. ... 3. ...``) or one item per line.

Game (facility location). Reference sentence t is "served" by the candidate that covers it best: s_tk is the
ROUGE recall (``rouge-score``, ``rouge1`` by default, stemmed) of reference sentence t by candidate k, and
U(S) = (1/T) · sum_t max_{k in S} s_tk with u0 = 0 -- a sum-of-max game, so Shapley credit is closed-form.
A candidate that restates what another already covers shares that credit; one that covers a reference
sentence nobody else does keeps it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.games import Game, SumOfMaxGame
from shapegrpo_core.tasks.base import Task

SPLITS = ("train", "eval")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
FIXTURE = Path(__file__).parent / "fixtures" / "summarize_tiny.jsonl"
PROMPT_TEMPLATE = (
    "Summarize the document in {k} different one-sentence summaries, as a numbered list. "
    "Document: {document} Summaries:"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after . ! ? and whitespace (enough for the plain prose used here)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Documents of a JSONL file as ``{"id", "document", "reference_sentences"}``; ValueError on bad lines."""
    path = Path(path)
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(row, dict) or not {"id", "document", "reference"} <= set(row):
                raise ValueError(f"{where}: expected an object with fields id, document, reference")
            doc, ref = row["document"], row["reference"]
            if not isinstance(doc, str) or not doc.strip():
                raise ValueError(f"{where}: document must be a non-empty string")
            if isinstance(ref, str):
                sentences = split_sentences(ref)
            elif isinstance(ref, list) and all(isinstance(s, str) for s in ref):
                sentences = [s.strip() for s in ref if s.strip()]
            else:
                raise ValueError(f"{where}: reference must be a string or a list of strings")
            if not sentences:
                raise ValueError(f"{where}: empty reference")
            docs.append(
                {"id": str(row["id"]), "document": " ".join(doc.split()), "reference_sentences": sentences}
            )
    if not docs:
        raise ValueError(f"no documents in {path}")
    return docs


class SummarizeTask(Task):
    """K summaries of a document; facility location of reference sentences by ROUGE recall (see module)."""

    name = "summarize"

    def __init__(
        self,
        num_candidates: int = 3,
        data_path: str | Path | None = None,
        eval_path: str | Path | None = None,
        eval_every: int = 4,
        rouge_type: str = "rouge1",
        use_stemmer: bool = True,
    ) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if rouge_type not in ROUGE_TYPES:
            raise ValueError(f"unknown rouge_type {rouge_type!r}; expected one of {ROUGE_TYPES}")
        if eval_path is None and eval_every < 2:
            raise ValueError(f"eval_every must be >= 2, got {eval_every}")
        self.num_candidates = num_candidates
        self.data_path = Path(data_path) if data_path is not None else FIXTURE
        self.eval_path = Path(eval_path) if eval_path is not None else None
        self.eval_every = eval_every
        self.rouge_type = rouge_type
        self.use_stemmer = use_stemmer
        self._docs: dict[str, list[dict[str, Any]]] | None = None
        self._scorer: Any = None

    # ---- data

    def documents(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self._docs is None:
            main = load_documents(self.data_path)
            if self.eval_path is not None:
                self._docs = {"train": main, "eval": load_documents(self.eval_path)}
            else:
                held = [i % self.eval_every == 0 for i in range(len(main))]
                self._docs = {
                    "train": [d for d, h in zip(main, held, strict=True) if not h],
                    "eval": [d for d, h in zip(main, held, strict=True) if h],
                }
        return self._docs[split]

    def format_prompt(self, document: str) -> str:
        return PROMPT_TEMPLATE.format(k=self.num_candidates, document=document)

    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        rows = [
            {
                "prompt": self.format_prompt(d["document"]),
                "id": d["id"],
                "document": d["document"],
                "reference_sentences": d["reference_sentences"],
            }
            for d in self.documents(split)
        ]
        random.Random(seed).shuffle(rows)
        return datasets.Dataset.from_list(rows)

    # ---- candidates and games

    def parse(self, completion: str) -> list[Candidate]:
        return parse_candidates(completion, style="numbered")

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer([self.rouge_type], use_stemmer=self.use_stemmer)
        return self._scorer

    def recall_matrix(self, references: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
        """(T, K): ROUGE recall of reference sentence t by summary k, in [0, 1]."""
        scores = np.zeros((len(references), len(summaries)))
        for t, ref in enumerate(references):
            for k, summary in enumerate(summaries):
                scores[t, k] = self.scorer.score(ref, summary)[self.rouge_type].recall
        return scores

    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        refs = example["reference_sentences"]
        if not refs:
            raise ValueError(f"example {example.get('id')!r} has no reference sentences")
        scores = self.recall_matrix(refs, [c.text for c in candidates])  # (T, K)
        return SumOfMaxGame(scores, weights=np.full(len(refs), 1.0 / len(refs)))

    # ---- warm start and tokenizer

    def demonstration_completion(self, document: str) -> str | None:
        """The document's first K sentences as a one-line numbered list (a format demonstration: extractive,
        not tuned to the references); None when the document has fewer than K distinct sentences."""
        sentences = list(dict.fromkeys(split_sentences(document)))[: self.num_candidates]
        if len(sentences) < self.num_candidates:
            return None
        return " " + " ".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))

    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        pool = [
            (self.format_prompt(d["document"]), c)
            for d in self.documents("train")
            if (c := self.demonstration_completion(d["document"])) is not None
        ]
        if not pool:
            raise ValueError(f"no training document has {self.num_candidates} sentences to demonstrate with")
        rng = random.Random(seed)
        order = rng.sample(range(len(pool)), min(num, len(pool)))
        order += [rng.randrange(len(pool)) for _ in range(num - len(order))]
        return datasets.Dataset.from_list([{"prompt": pool[i][0], "completion": pool[i][1]} for i in order])

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated word of the prompts, references and demonstrations, plus the list
        markers ``1.`` .. ``K.`` (sorted, unique)."""
        words = {f"{i}." for i in range(1, self.num_candidates + 1)}
        for split in SPLITS:
            for d in self.documents(split):
                words.update(self.format_prompt(d["document"]).split())
                words.update(w for s in d["reference_sentences"] for w in s.split())
        return sorted(words)
