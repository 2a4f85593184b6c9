"""The ``recsys_nl`` task: recommendations in natural language, for instruction-tuned models.

The world is :mod:`shapegrpo_core.tasks.recsys`'s (a seeded synthetic catalogue and users, or MovieLens
files with ``movielens_path=``), the games too (best-of-set, interest coverage, soft coverage: sum-of-max,
so Shapley credit is closed-form). What changes is the language: items have **titles** -- readable made-up
film titles whose words hint at the genre ("The Last Starship", "Midnight Curse") in the synthetic world,
the real titles in MovieLens -- the prompt shows the user's history as titles and a pool of catalogue titles
to choose from, and the answer is K titles, as a numbered or bulleted list, one per line, or comma-separated
on one line.

Matching a candidate to the catalogue (:func:`normalize_title`): Unicode NFKC, case-folded, markdown and
quotes dropped, a trailing year ("(1995)", "1995") and other parenthesised parts removed, MovieLens's "Lion
King, The" read as "The Lion King", "&" read as "and", punctuation and repeated whitespace dropped, and a
leading article ignored. A title that does not match as a whole is tried again up to a " - " / ": "
(a title followed by a description). Several catalogue items with the same normalised title (remakes) are
told apart by the year when the candidate gives one, else the first in catalogue order is taken.

Value. A candidate that matches no catalogue item (hallucinated: a known failure of LLM recommenders) or
an item of the user's history is worth 0 -- a null player, Shapley credit 0 -- and is counted in
:attr:`NLRecsysTask.stats` (``hallucinated``, ``history``; ``matched`` and ``duplicate`` too).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.tasks.recsys import Catalogue, RecsysTask, UserRecord

# Words whose titles an LLM can read a genre from (synthetic catalogue); genres beyond these use GENERIC.
GENRE_NOUNS: dict[str, tuple[str, ...]] = {
    "action": ("Strike", "Fury", "Vendetta", "Bullet", "Siege", "Outlaw", "Rampage", "Renegade", "Showdown"),
    "comedy": ("Wedding", "Roommates", "Vacation", "Mix-Up", "Neighbors", "Prank", "Road Trip", "Picnic"),
    "drama": (
        "Letters",
        "Inheritance",
        "Harvest",
        "Confession",
        "Homecoming",
        "Verdict",
        "Orchard",
        "Promise",
    ),
    "horror": ("Haunting", "Curse", "Crypt", "Possession", "Asylum", "Ritual", "Nightmare", "Graveyard"),
    "romance": ("Kiss", "Love Letter", "Sweetheart", "Honeymoon", "Serenade", "Valentine", "Heartbeat"),
    "scifi": ("Starship", "Android", "Galaxy", "Colony", "Wormhole", "Cyborg", "Mars Mission", "Orbit"),
    "thriller": ("Conspiracy", "Witness", "Ransom", "Double Cross", "Alibi", "Informant", "Hostage"),
    "documentary": ("Oceans", "Wildlife", "Glaciers", "Chefs", "Factories", "Coral Reefs", "Volcanoes"),
}
GENERIC_NOUNS = ("Journey", "Story", "Summer", "River", "City", "Road", "Storm", "Garden", "Island")
MODIFIERS = (
    "The Last",
    "Midnight",
    "Silver",
    "Broken",
    "Crimson",
    "Hidden",
    "Golden",
    "Northern",
    "Lost",
    "Endless",
    "Burning",
    "Quiet",
    "Second",
    "Wild",
)
PROMPT_TEMPLATE = (
    "A user watched and liked these movies: {history}.\n"
    "Recommend {k} other movies they would enjoy, chosen from this list: {pool}.\n"
    "Answer with a numbered list of {k} titles, nothing else."
)
STAT_KEYS = ("candidates", "matched", "hallucinated", "history", "duplicate")

_YEAR_AT_END = re.compile(r"\s*[(\[]?\b(1[89]\d{2}|20\d{2})[)\]]?\s*$")
_PARENS = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_ARTICLE_SUFFIX = re.compile(r"^(.*),\s*(the|a|an)$")
_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+")
_DESCRIPTION = re.compile(r"\s+[-–—]\s+|:\s+")


def title_year(title: str) -> int | None:
    """The trailing year of a title ("Heat (1995)" -> 1995), or None."""
    m = _YEAR_AT_END.search(unicodedata.normalize("NFKC", title).strip().strip("*_`\"'“”‘’"))
    return int(m.group(1)) if m else None


def normalize_title(title: str) -> str:
    """A title reduced for matching (module docstring): ``"**The Lion King (1994)**"`` -> ``"lion king"``."""
    text = unicodedata.normalize("NFKC", title).casefold().strip()
    text = re.sub(r"[*_`\"“”‘’]", "", text).strip().strip("'").strip()
    text = _YEAR_AT_END.sub("", text)
    text = _PARENS.sub(" ", text).strip()
    text = " ".join(text.split())
    m = _ARTICLE_SUFFIX.match(text)
    if m:
        text = f"{m.group(2)} {m.group(1)}"
    text = text.replace("&", " and ")
    text = re.sub(r"[^\w\s]", " ", text)
    text = " ".join(text.split())
    return _LEADING_ARTICLE.sub("", text)


@dataclass(frozen=True)
class TitleMatch:
    """How one candidate matched: the catalogue item (None: hallucinated) and why it is worth 0 if it is."""

    text: str
    item: int | None
    in_history: bool = False
    duplicate: bool = False

    @property
    def valid(self) -> bool:
        return self.item is not None and not self.in_history


class TitleIndex:
    """Normalised title (with and without its year) -> catalogue items, in catalogue order."""

    def __init__(self, titles: Sequence[str]) -> None:
        self.by_name: dict[str, list[int]] = {}
        self.by_name_year: dict[tuple[str, int], list[int]] = {}
        for j, title in enumerate(titles):
            name = normalize_title(title)
            if not name:
                raise ValueError(f"catalogue title {title!r} (item {j}) has no letters or digits")
            self.by_name.setdefault(name, []).append(j)
            year = title_year(title)
            if year is not None:
                self.by_name_year.setdefault((name, year), []).append(j)

    def lookup(self, text: str) -> int | None:
        """The catalogue item a candidate names, or None (module docstring for the rules)."""
        for piece in (text, _DESCRIPTION.split(text.strip(), maxsplit=1)[0]):
            name = normalize_title(piece)
            year = title_year(piece)
            if year is not None and (name, year) in self.by_name_year:
                return self.by_name_year[(name, year)][0]
            if name in self.by_name:
                return self.by_name[name][0]
        return None


def synthetic_titles(catalogue: Catalogue, rng: np.random.Generator) -> tuple[str, ...]:
    """One distinct readable title per item, "<modifier> <noun>" with a noun of the item's (first) genre."""
    used: set[str] = set()
    titles = []
    for genres in catalogue.item_genres:
        genre = catalogue.genres[genres[0]] if genres else ""
        nouns = GENRE_NOUNS.get(genre, GENERIC_NOUNS)
        combos = [f"{m} {n}" for m in MODIFIERS for n in nouns if f"{m} {n}" not in used]
        if not combos:  # the genre's names are used up: a sequel number keeps titles distinct
            combos = [f"{m} {n} {s}" for s in range(2, 100) for m in MODIFIERS for n in nouns]
            combos = [c for c in combos if c not in used]
        title = combos[int(rng.integers(len(combos)))]
        used.add(title)
        titles.append(title)
    return tuple(titles)


def split_title_list(completion: str) -> list[Candidate]:
    """Candidates of a title list: numbered, else bulleted, else one per line (or ";"-separated), else, on one
    line, comma or semicolon separated.

    Commas split only a one-line answer: MovieLens titles hold commas ("Lion King, The"), a list one per line
    keeps them whole."""
    for style in ("numbered", "bullets"):
        found = parse_candidates(completion, style=style)
        if found:
            return found
    if "\n" in completion.strip():
        return parse_candidates(completion, style="delimited", delimiters=";")
    return parse_candidates(completion, style="delimited", delimiters=",;")


class NLRecsysTask(RecsysTask):
    """Recommend K movies by title (module docstring). Constructor arguments as :class:`RecsysTask`'s, plus
    ``pool_size``: how many catalogue titles the prompt offers (history excluded; about half of them relevant
    to the user when there are enough; None: the whole catalogue)."""

    name = "recsys_nl"

    def __init__(self, *args: Any, pool_size: int | None = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_titles(pool_size)

    def _setup_titles(self, pool_size: int | None) -> None:
        if pool_size is not None and pool_size < self.num_candidates:
            raise ValueError(f"pool_size={pool_size} must be >= num_candidates={self.num_candidates}")
        if self.catalogue.titles is None:
            titles = synthetic_titles(self.catalogue, np.random.default_rng([self.seed, 3]))
            self.catalogue = replace(self.catalogue, titles=titles)
        self.titles: tuple[str, ...] = tuple(self.catalogue.titles or ())
        self.pool_size = pool_size
        self.index = TitleIndex(self.titles)
        self.stats: Counter[str] = Counter()

    @classmethod
    def from_world(
        cls, catalogue: Catalogue, users: Mapping[str, Sequence[UserRecord]], **kwargs: Any
    ) -> NLRecsysTask:
        pool_size = kwargs.pop("pool_size", 16)
        task = super().from_world(catalogue, users, **kwargs)
        assert isinstance(task, NLRecsysTask)
        task._setup_titles(pool_size)
        return task

    @classmethod
    def from_movielens(cls, path: str | Path, **kwargs: Any) -> NLRecsysTask:
        return cls(movielens_path=path, **kwargs)

    # ---- dataset

    def pool(self, user: UserRecord) -> list[int]:
        """The items the prompt offers ``user``: up to half relevant (rel > 0), the rest random, none from
        the history; seeded by the task seed and the user id (the same pool in every run)."""
        rng = np.random.default_rng([self.seed, 4, int(user.user_id)])
        seen = set(user.history)
        others = [j for j in range(self.catalogue.num_items) if j not in seen]
        size = len(others) if self.pool_size is None else min(self.pool_size, len(others))
        rel = np.asarray(user.relevance)
        good = [j for j in others if rel[j] > 0]
        picked = [int(j) for j in rng.permutation(good)[: size // 2]]
        rest = [j for j in others if j not in set(picked)]
        picked += [int(j) for j in rng.permutation(rest)[: size - len(picked)]]
        return [int(j) for j in rng.permutation(picked)]

    def row(self, user: UserRecord) -> dict[str, Any]:
        base = super().row(user)
        history_titles = [self.titles[j] for j in user.history]
        pool_titles = [self.titles[j] for j in self.pool(user)]
        prompt = PROMPT_TEMPLATE.format(
            history="; ".join(history_titles), k=self.num_candidates, pool="; ".join(pool_titles)
        )
        return {**base, "prompt": prompt, "history_titles": history_titles, "pool_titles": pool_titles}

    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; choose one of ('train', 'eval')")
        users = self.users[split]
        order = np.random.default_rng(seed).permutation(len(users))
        strings = datasets.Sequence(datasets.Value("string"))
        features = datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "user_id": datasets.Value("int64"),
                "history": strings,
                "interests": strings,
                "interest_weights": datasets.Sequence(datasets.Value("float64")),
                "relevance": datasets.Sequence(datasets.Value("float64")),
                "history_titles": strings,
                "pool_titles": strings,
            }
        )
        return datasets.Dataset.from_list([self.row(users[i]) for i in order], features=features)

    # ---- scoring

    def parse(self, completion: str) -> list[Candidate]:
        return split_title_list(completion)

    def item_of(self, text: str) -> int | None:
        return self.index.lookup(text)

    def match(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> list[TitleMatch]:
        """Each candidate's catalogue item, whether it is in the history, and whether it repeats an earlier
        candidate's item."""
        history = {self._item_index[t] for t in example["history"] if t in self._item_index}
        seen: set[int] = set()
        out = []
        for c in candidates:
            j = self.item_of(c.text)
            out.append(TitleMatch(c.text, j, in_history=j in history, duplicate=j is not None and j in seen))
            if j is not None:
                seen.add(j)
        return out

    def candidate_items(
        self, candidates: Sequence[Candidate], example: Mapping[str, Any]
    ) -> list[int | None]:
        matches = self.match(candidates, example)
        self.stats.update(
            candidates=len(matches),
            matched=sum(m.valid for m in matches),
            hallucinated=sum(m.item is None for m in matches),
            history=sum(m.in_history for m in matches),
            duplicate=sum(m.duplicate for m in matches),
        )
        return [m.item if m.valid else None for m in matches]

    def format_valid(self, completion: str) -> bool:
        """Exactly K candidates naming K distinct catalogue items (history items allowed: a preference
        error, not a format error, as in ``recsys``)."""
        items = [self.item_of(c.text) for c in self.parse(completion)]
        return len(items) == self.num_candidates and None not in items and len(set(items)) == len(items)

    # ---- warm start and tokenizer

    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        """Prompts of random train users, answers of K random titles of their pool (the format only)."""
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        rng = np.random.default_rng(seed)
        users = self.users["train"]
        prompts, completions = [], []
        for u in rng.integers(0, len(users), size=num):
            row = self.row(users[int(u)])
            picks = rng.choice(len(row["pool_titles"]), size=self.num_candidates, replace=False)
            prompts.append(row["prompt"])
            completions.append("\n".join(f"{i}. {row['pool_titles'][p]}" for i, p in enumerate(picks, 1)))
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})

    def vocabulary(self) -> list[str]:
        words: dict[str, None] = {f"{i}.": None for i in range(1, self.num_candidates + 1)}
        for split in ("train", "eval"):
            for user in self.users[split]:
                words.update(dict.fromkeys(self.row(user)["prompt"].split()))
        for title in self.titles:
            words.update(dict.fromkeys(title.split()))
        return list(words)


__all__ = [
    "GENRE_NOUNS",
    "PROMPT_TEMPLATE",
    "NLRecsysTask",
    "TitleIndex",
    "TitleMatch",
    "normalize_title",
    "split_title_list",
    "synthetic_titles",
    "title_year",
]
