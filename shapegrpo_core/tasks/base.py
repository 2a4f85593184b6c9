"""The task interface: what a task must provide so that the trainer, evaluation and the pipeline can use it.

A task turns a prompt into a dataset row, a completion into candidates with character spans, and candidates
into a cooperative game whose value is the set-level utility (docs/tasks.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.games import Game


class Task(ABC):
    """A multi-candidate task.

    Subclasses set ``name`` and ``num_candidates`` (K, the number of candidates the prompt asks for) and
    implement the abstract methods. Dataset rows always have a ``prompt`` column (a string, or a list of chat
    messages when the task is meant for chat models) plus whatever columns :meth:`game` needs to score a
    response; those columns must be JSON-serialisable so that they survive parquet and Dagster hand-offs.
    """

    name: str
    num_candidates: int

    @abstractmethod
    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        """Rows for ``split`` ("train" or "eval"); the same seed gives the same rows."""

    @abstractmethod
    def parse(self, completion: str) -> list[Candidate]:
        """Candidates of one completion, with character spans into ``completion``.

        Never raises on malformed text: returns whatever candidates it finds (possibly zero, possibly more
        than ``num_candidates``). Callers score only the first ``num_candidates``; extra ones count as a
        format violation (see :meth:`format_valid`) and their tokens get the set advantage.
        """

    @abstractmethod
    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        """The cooperative game over ``len(candidates)`` players for one response to ``example``.

        With zero candidates the game has zero players and its value is ``u0``.
        """

    def games(self, items: Sequence[tuple[Sequence[Candidate], Mapping[str, Any]]]) -> list[Game]:
        """The games of many responses, ``items[i] = (candidates, example)``, in order: one per item.

        The trainer and evaluation score a whole batch through this one call, so a task whose scorer has a
        fixed cost per call (e.g. ``code``: one sandbox worker pool) overrides it to share that cost. This
        default is the loop over :meth:`game`. If it raises, callers score the items one by one with
        :meth:`game` to find the failing ones, so an override may raise for the whole batch.
        """
        return [self.game(candidates, example) for candidates, example in items]

    @abstractmethod
    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        """Format-only demonstrations (columns ``prompt``, ``completion``) for the SFT warm start.

        They teach the output format (K well-formed candidates), not the preferences the reward encodes.
        """

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word the task's prompts and completions use, for the offline word-level tokenizer."""

    def format_valid(self, completion: str) -> bool:
        """Whether ``completion`` holds exactly ``num_candidates`` distinct, well-formed candidates."""
        cands = self.parse(completion)
        texts = [c.text.strip() for c in cands]
        return len(cands) == self.num_candidates and len(set(texts)) == len(texts) and all(texts)
