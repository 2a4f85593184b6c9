"""The ``recsys`` task (the embedded default): recommend K items to a user given their history
(docs/tasks.md).

World. A catalogue of items, each with genres and a quality in [0, 1], and users, each with a few interest
genres of different strength and a history of items drawn from those genres. The relevance of item j for
user u is

    rel(u, j) = quality_j * max_{g in genres_j} affinity_u(g)        in [0, 1]

with affinity_u(g) = strength of g relative to the user's strongest interest (1 for the top interest) and
``background_affinity`` (default 0) for genres the user is not interested in. Items already in the history
have relevance 0 (the user has seen them). Because history items are sampled from the interest genres, the
relevant items are inferable from the prompt: a policy can learn "recommend good items of the genres in the
history".

Prompt and completion. ``"history: i12 i40 i7 i33 i2 -> recommend 4:"`` and ``" i3, i17, i41, i8"`` (comma
delimited item tokens). A candidate that is not an item of the catalogue, or is in the history, is worth 0.

Games (all sum-of-max, so Shapley credit is closed-form):

* ``best_of_set``: U(S) = max_{j in S} rel(u, j) (the user picks the best item), u0 = 0.
* ``coverage``: one target per interest genre t with weight w_t (interest strength, summing to 1); the target
  is hit when some candidate has genre t and rel >= ``coverage_threshold``. U(S) = sum_t w_t [t hit by S].
* ``soft_coverage``: as coverage, the binary hit replaced by the relevance of the best in-genre candidate.

Also builds the same kind of task from MovieLens files (:meth:`RecsysTask.from_movielens`), with relevance
from held-out ratings (see :mod:`shapegrpo_core.tasks.movielens`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.games import Game, SumOfMaxGame, best_of_set, coverage
from shapegrpo_core.tasks import movielens
from shapegrpo_core.tasks.base import Task

GAMES = ("best_of_set", "coverage", "soft_coverage")
SPLITS = ("train", "eval")
# Words that synthetic genres are named after (then g8, g9, ... when more are asked for).
GENRE_WORDS = ("action", "comedy", "drama", "horror", "romance", "scifi", "thriller", "documentary")
# Fixed words and punctuation of the prompt/completion format, for the tokenizer's vocabulary.
PROMPT_WORDS = ("history", "->", "recommend")
PUNCTUATION = (",", ":")


def item_token(index: int) -> str:
    """The word that names catalogue item ``index`` in prompts and completions."""
    return f"i{index}"


def genre_word(name: str) -> str:
    """A genre name as one lowercase alphanumeric word ("Sci-Fi" -> "scifi", "Children's" -> "childrens")."""
    word = re.sub(r"[^0-9a-z]", "", name.lower())
    if not word:
        raise ValueError(f"genre name {name!r} has no letters or digits")
    return word


def format_prompt_text(history_tokens: Sequence[str], num_candidates: int) -> str:
    """The recsys prompt. It ends on ":" without a trailing space; completions start with a space."""
    return f"history: {' '.join(history_tokens)} -> recommend {num_candidates}:"


def format_completion_text(item_tokens: Sequence[str]) -> str:
    """A well-formed completion: a leading space, then the item tokens joined by ", "."""
    return " " + ", ".join(item_tokens)


@dataclass(frozen=True)
class Catalogue:
    """Items 0..num_items-1 (token ``i<index>``), their genres (indices into ``genres``) and metadata."""

    genres: tuple[str, ...]  # genre words
    item_genres: tuple[tuple[int, ...], ...]  # (num_items,) tuples of genre indices
    quality: tuple[float, ...] | None = None  # (num_items,) synthetic world only
    titles: tuple[str, ...] | None = None  # MovieLens only
    source_ids: tuple[int, ...] | None = None  # MovieLens movieId of each item

    def __post_init__(self) -> None:
        n = len(self.item_genres)
        for name, col in (
            ("quality", self.quality),
            ("titles", self.titles),
            ("source_ids", self.source_ids),
        ):
            if col is not None and len(col) != n:
                raise ValueError(f"catalogue {name} has {len(col)} entries for {n} items")
        if len(set(self.genres)) != len(self.genres):
            raise ValueError(f"genre words must be distinct, got {self.genres}")
        for j, gs in enumerate(self.item_genres):
            if any(not 0 <= g < len(self.genres) for g in gs):
                raise ValueError(f"item {j} has genre indices {gs} outside 0..{len(self.genres) - 1}")

    @property
    def num_items(self) -> int:
        return len(self.item_genres)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(item_token(j) for j in range(self.num_items))

    def to_dict(self) -> dict[str, Any]:
        return {
            "genres": list(self.genres),
            "item_genres": [list(gs) for gs in self.item_genres],
            "quality": None if self.quality is None else list(self.quality),
            "titles": None if self.titles is None else list(self.titles),
            "source_ids": None if self.source_ids is None else list(self.source_ids),
        }


@dataclass(frozen=True)
class UserRecord:
    """One user as the dataset shows it: a history, interests and the relevance of every catalogue item."""

    user_id: int
    history: tuple[int, ...]  # item indices, oldest first
    interests: tuple[int, ...]  # genre indices, strongest first
    interest_weights: tuple[float, ...]  # same length as interests, sum to 1
    relevance: tuple[float, ...]  # (num_items,), in [0, 1], 0 on history items


# ----------------------------------------------------------------------------------------- synthetic world


def make_catalogue(num_items: int, num_genres: int, rng: np.random.Generator) -> Catalogue:
    """Items with one genre each (genres balanced: every genre has num_items // num_genres or one more items)
    and a quality drawn uniformly from [0.1, 1.0], rounded to 2 decimals."""
    if num_genres < 1 or num_items < num_genres:
        raise ValueError(
            f"need 1 <= num_genres <= num_items, got num_genres={num_genres}, num_items={num_items}"
        )
    genres = tuple(GENRE_WORDS[g] if g < len(GENRE_WORDS) else f"g{g}" for g in range(num_genres))
    item_genre = rng.permutation(np.arange(num_items) % num_genres)  # (num_items,)
    quality = np.round(rng.uniform(0.1, 1.0, size=num_items), 2)  # (num_items,)
    return Catalogue(
        genres=genres,
        item_genres=tuple((int(g),) for g in item_genre),
        quality=tuple(float(q) for q in quality),
    )


def affinity(
    num_genres: int, interests: Sequence[int], strengths: Sequence[float], background: float
) -> np.ndarray:
    """affinity_u(g) for every genre: strength / max strength on interest genres, ``background`` elsewhere."""
    a = np.full(num_genres, background, dtype=np.float64)  # (G,)
    if len(interests):
        s = np.asarray(strengths, dtype=np.float64)
        a[list(interests)] = np.maximum(s / s.max(), background)
    return a


def relevance(catalogue: Catalogue, genre_affinity: np.ndarray, history: Sequence[int]) -> np.ndarray:
    """rel_j = quality_j * max_{g in genres_j} affinity(g), and 0 on history items. Shape (num_items,)."""
    if catalogue.quality is None:
        raise ValueError("relevance() needs a catalogue with item quality (the synthetic world)")
    best_affinity = np.array(
        [max((genre_affinity[g] for g in gs), default=0.0) for gs in catalogue.item_genres]
    )  # (num_items,)
    rel = np.asarray(catalogue.quality) * best_affinity
    rel[list(history)] = 0.0
    return rel


def make_user(
    user_id: int,
    catalogue: Catalogue,
    num_interests: int,
    history_len: int,
    background_affinity: float,
    rng: np.random.Generator,
) -> UserRecord:
    """A synthetic user: ``num_interests`` distinct genres with strengths ~ U[0.3, 1], and a history of
    ``history_len`` distinct items of those genres: one item of each interest genre (so that every interest
    can be inferred from the prompt), the rest drawn with probability proportional to their genre's strength
    (so that the stronger interest tends to show more often), in random order."""
    num_genres = len(catalogue.genres)
    if not 1 <= num_interests <= num_genres:
        raise ValueError(f"num_interests must be in 1..{num_genres}, got {num_interests}")
    if history_len < num_interests:
        raise ValueError(f"history_len={history_len} must be >= num_interests={num_interests}")
    interests = rng.choice(num_genres, size=num_interests, replace=False)
    strengths = rng.uniform(0.3, 1.0, size=num_interests)
    order = np.argsort(-strengths, kind="stable")  # strongest first
    interests, strengths = interests[order], strengths[order]
    weights = strengths / strengths.sum()

    genre_weight = dict(zip(interests.tolist(), weights.tolist(), strict=True))
    pool = [j for j, gs in enumerate(catalogue.item_genres) if any(g in genre_weight for g in gs)]
    if len(pool) < history_len:
        raise ValueError(
            f"only {len(pool)} items in a user's {num_interests} interest genres, fewer than history_len="
            f"{history_len}; use more items, fewer genres or more interests"
        )
    history: list[int] = []
    for g in interests.tolist():  # one item per interest genre
        members = [j for j in pool if g in catalogue.item_genres[j] and j not in history]
        if not members:
            raise ValueError(f"genre {catalogue.genres[g]!r} has no item left for a user's history")
        history.append(int(rng.choice(members)))
    rest = [j for j in pool if j not in history]
    p = np.array([max(genre_weight.get(g, 0.0) for g in catalogue.item_genres[j]) for j in rest])
    history += rng.choice(rest, size=history_len - len(history), replace=False, p=p / p.sum()).tolist()
    history = rng.permutation(history).tolist()

    genre_affinity = affinity(num_genres, interests.tolist(), strengths.tolist(), background_affinity)
    rel = relevance(catalogue, genre_affinity, history)
    return UserRecord(
        user_id=user_id,
        history=tuple(int(j) for j in history),
        interests=tuple(int(g) for g in interests),
        interest_weights=tuple(float(w) for w in weights),
        relevance=tuple(float(r) for r in rel),
    )


# ----------------------------------------------------------------------------------------- MovieLens world


def movielens_world(
    path: str | Path,
    *,
    history_len: int,
    holdout: int,
    num_interests: int,
    min_item_ratings: int,
    eval_fraction: float,
    seed: int,
    layout: movielens.Layout = "auto",
) -> tuple[Catalogue, dict[str, list[UserRecord]]]:
    """Catalogue and users from MovieLens files.

    Items are the movies with at least ``min_item_ratings`` ratings (ordered by movieId; item ``i<k>`` is the
    k-th). Per user: ratings by time; the last ``holdout`` are held out (relevance rating/5), the prompt shows
    the last ``history_len`` earlier ones. Interests are the user's top ``num_interests`` genres over all
    earlier ratings, weighted by rating/5. Users are split into train/eval by a seeded permutation.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    data = movielens.read_movielens(path, layout)
    counts = movielens.item_rating_counts(data.ratings)
    movie_ids = sorted(m for m in data.movies if counts[m] >= min_item_ratings)
    if not movie_ids:
        raise ValueError(f"no movie in {str(path)!r} has >= {min_item_ratings} ratings")
    index_of = {m: j for j, m in enumerate(movie_ids)}
    genre_names = sorted({g for m in movie_ids for g in data.movies[m].genres})
    words = [genre_word(g) for g in genre_names]
    if len(set(words)) != len(words):
        raise ValueError(f"MovieLens genre names collide once made into words: {genre_names}")
    genre_index = {g: k for k, g in enumerate(genre_names)}
    catalogue = Catalogue(
        genres=tuple(words),
        item_genres=tuple(tuple(genre_index[g] for g in data.movies[m].genres) for m in movie_ids),
        titles=tuple(data.movies[m].title for m in movie_ids),
        source_ids=tuple(movie_ids),
    )

    kept = [r for r in data.ratings if r.movie_id in index_of]
    users = []
    for split in movielens.split_by_time(kept, holdout=holdout):
        rel = np.zeros(catalogue.num_items)  # (num_items,)
        for r in split.heldout:
            rel[index_of[r.movie_id]] = r.rating / movielens.MAX_RATING
        history = [index_of[r.movie_id] for r in split.history[-history_len:]]
        rel[history] = 0.0
        genre_score = np.zeros(len(catalogue.genres))  # (G,)
        for r in split.history:
            for g in catalogue.item_genres[index_of[r.movie_id]]:
                genre_score[g] += r.rating / movielens.MAX_RATING
        top = [int(g) for g in np.argsort(-genre_score, kind="stable")[:num_interests] if genre_score[g] > 0]
        weights = genre_score[top] / genre_score[top].sum() if top else np.zeros(0)
        users.append(
            UserRecord(
                user_id=split.user_id,
                history=tuple(history),
                interests=tuple(top),
                interest_weights=tuple(float(w) for w in weights),
                relevance=tuple(float(x) for x in rel),
            )
        )
    if len(users) < 2:
        raise ValueError(
            f"only {len(users)} MovieLens users have more than holdout={holdout} ratings; need at least 2"
        )
    perm = np.random.default_rng(seed).permutation(len(users))
    num_eval = min(max(1, round(eval_fraction * len(users))), len(users) - 1)
    eval_users = sorted(perm[:num_eval].tolist())
    train_users = sorted(perm[num_eval:].tolist())
    return catalogue, {"train": [users[i] for i in train_users], "eval": [users[i] for i in eval_users]}


# ----------------------------------------------------------------------------------------- the task


class RecsysTask(Task):
    """Recommend ``num_candidates`` items given a user's history; see the module docstring.

    The world (catalogue and users) is fixed by the constructor ``seed``; :meth:`build_dataset`'s seed only
    sets the row order. Pass ``movielens_path`` (or use :meth:`from_movielens`) to read MovieLens files
    instead of generating the synthetic world; the synthetic size arguments are then ignored.
    """

    name = "recsys"

    def __init__(
        self,
        num_items: int = 60,
        num_genres: int = 8,
        num_train_users: int = 400,
        num_eval_users: int = 100,
        num_candidates: int = 4,
        history_len: int = 5,
        num_interests: int = 2,
        game: str = "best_of_set",
        coverage_threshold: float | None = None,
        background_affinity: float = 0.0,
        seed: int = 0,
        *,
        movielens_path: str | Path | None = None,
        movielens_layout: movielens.Layout = "auto",
        holdout: int = 10,
        min_item_ratings: int = 1,
        eval_fraction: float = 0.2,
    ) -> None:
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        if not 0.0 <= background_affinity <= 1.0:
            raise ValueError(f"background_affinity must be in [0, 1], got {background_affinity}")
        if movielens_path is None:
            if num_train_users < 1 or num_eval_users < 1:
                raise ValueError("num_train_users and num_eval_users must be >= 1")
            if num_items < history_len + num_candidates:
                raise ValueError(
                    f"num_items={num_items} must be >= history_len + num_candidates "
                    f"= {history_len + num_candidates}"
                )
            # Independent random streams: resizing one split does not change the catalogue or the other split.
            catalogue = make_catalogue(num_items, num_genres, np.random.default_rng([seed, 0]))
            users = {
                split: [
                    make_user(u, catalogue, num_interests, history_len, background_affinity, rng)
                    for u in range(offset, offset + n)
                ]
                for split, offset, n, rng in (
                    ("train", 0, num_train_users, np.random.default_rng([seed, 1])),
                    ("eval", num_train_users, num_eval_users, np.random.default_rng([seed, 2])),
                )
            }
            # rel >= 0.25: a quality >= 0.25 item of the top interest, or a better item of a weaker one.
            default_threshold = 0.25
        else:
            catalogue, users = movielens_world(
                movielens_path,
                history_len=history_len,
                holdout=holdout,
                num_interests=num_interests,
                min_item_ratings=min_item_ratings,
                eval_fraction=eval_fraction,
                seed=seed,
                layout=movielens_layout,
            )
            default_threshold = 0.7  # rel >= 0.7: a held-out rating of 3.5 stars or more
        self._setup(
            catalogue,
            users,
            num_candidates=num_candidates,
            game=game,
            coverage_threshold=default_threshold if coverage_threshold is None else coverage_threshold,
            seed=seed,
        )

    def _setup(
        self,
        catalogue: Catalogue,
        users: Mapping[str, Sequence[UserRecord]],
        *,
        num_candidates: int,
        game: str,
        coverage_threshold: float,
        seed: int,
    ) -> None:
        if game not in GAMES:
            raise ValueError(f"unknown recsys game {game!r}; choose one of {GAMES}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if set(users) != set(SPLITS) or not all(users[s] for s in SPLITS):
            raise ValueError(f"users must have non-empty splits {SPLITS}, got {sorted(users)}")
        for split in SPLITS:
            for u in users[split]:
                if len(u.relevance) != catalogue.num_items:
                    raise ValueError(
                        f"user {u.user_id} has {len(u.relevance)} relevances for {catalogue.num_items} items"
                    )
                if catalogue.num_items - len(set(u.history)) < num_candidates:
                    raise ValueError(f"user {u.user_id}: fewer than num_candidates items outside the history")
        self.catalogue = catalogue
        self.users = {split: list(users[split]) for split in SPLITS}
        self.num_candidates = num_candidates
        self.game_name = game
        self.coverage_threshold = coverage_threshold
        self.seed = seed
        self._item_index = {tok: j for j, tok in enumerate(catalogue.tokens)}

    @classmethod
    def from_world(
        cls,
        catalogue: Catalogue,
        users: Mapping[str, Sequence[UserRecord]],
        *,
        num_candidates: int = 4,
        game: str = "best_of_set",
        coverage_threshold: float = 0.25,
        seed: int = 0,
    ) -> RecsysTask:
        """The task on a given catalogue and users ({"train": [...], "eval": [...]}), e.g. a hand-made one."""
        task = cls.__new__(cls)
        task._setup(
            catalogue,
            users,
            num_candidates=num_candidates,
            game=game,
            coverage_threshold=coverage_threshold,
            seed=seed,
        )
        return task

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RecsysTask:
        """The task on a named world of :data:`PRESETS`, constructor arguments overridden (game, seed, split
        sizes, ...): ``RecsysTask.from_preset("interests", game="coverage")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown recsys preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**(PRESETS[name] | overrides))

    @classmethod
    def from_movielens(cls, path: str | Path, **kwargs: Any) -> RecsysTask:
        """The recsys task on MovieLens files in ``path`` (ml-latest ``ratings.csv``/``movies.csv`` or ml-100k
        ``u.data``/``u.item``). Keyword arguments as for the constructor (holdout, history_len, game, ...)."""
        return cls(movielens_path=path, **kwargs)

    # ----------------------------------------------------------------------------------------- dataset

    def row(self, user: UserRecord) -> dict[str, Any]:
        """The dataset row of one user: the prompt and the JSON-serialisable columns :meth:`game` needs."""
        history = [item_token(j) for j in user.history]
        return {
            "prompt": format_prompt_text(history, self.num_candidates),
            "user_id": int(user.user_id),
            "history": history,
            "interests": [self.catalogue.genres[g] for g in user.interests],
            "interest_weights": list(user.interest_weights),
            "relevance": list(user.relevance),
        }

    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        users = self.users[split]
        order = np.random.default_rng(seed).permutation(len(users))
        rows = [self.row(users[i]) for i in order]
        features = datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "user_id": datasets.Value("int64"),
                "history": datasets.Sequence(datasets.Value("string")),
                "interests": datasets.Sequence(datasets.Value("string")),
                "interest_weights": datasets.Sequence(datasets.Value("float64")),
                "relevance": datasets.Sequence(datasets.Value("float64")),
            }
        )
        return datasets.Dataset.from_list(rows, features=features)

    def save(self, data_dir: str | Path = "data/recsys", seed: int = 0) -> dict[str, Path]:
        """Write ``train.parquet``, ``eval.parquet`` and ``catalogue.json`` under ``data_dir``; return their
        paths (keys "train", "eval", "catalogue")."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for split in SPLITS:
            paths[split] = data_dir / f"{split}.parquet"
            self.build_dataset(split, seed).to_parquet(str(paths[split]))
        paths["catalogue"] = data_dir / "catalogue.json"
        meta = {
            "task": self.name,
            "num_candidates": self.num_candidates,
            "game": self.game_name,
            "coverage_threshold": self.coverage_threshold,
            "catalogue": self.catalogue.to_dict(),
        }
        paths["catalogue"].write_text(json.dumps(meta, indent=1))
        return paths

    # ----------------------------------------------------------------------------------------- scoring

    def parse(self, completion: str) -> list[Candidate]:
        return parse_candidates(completion, style="delimited")

    def item_of(self, text: str) -> int | None:
        """Catalogue index of a candidate text (``"i12"`` -> 12), or None when it names no item."""
        return self._item_index.get(text.strip())

    def candidate_items(
        self, candidates: Sequence[Candidate], example: Mapping[str, Any]
    ) -> list[int | None]:
        """Catalogue index of each candidate, None for non-items and for items already in the history."""
        history = set(example["history"])
        items = []
        for c in candidates:
            j = self.item_of(c.text)
            items.append(None if j is None or c.text.strip() in history else j)
        return items

    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        rel = np.asarray(example["relevance"], dtype=np.float64)  # (num_items,)
        if rel.shape != (self.catalogue.num_items,):
            raise ValueError(
                f"example relevance has shape {rel.shape}, expected ({self.catalogue.num_items},): "
                "was the row built by a different catalogue?"
            )
        items = self.candidate_items(candidates, example)
        # Invalid candidates (non-items, history items) score the floor 0: null players, Shapley credit 0.
        cand_rel = np.array([0.0 if j is None else rel[j] for j in items], dtype=np.float64)  # (K,)
        if self.game_name == "best_of_set":
            return best_of_set(cand_rel, floor=0.0)

        genre_index = {g: k for k, g in enumerate(self.catalogue.genres)}
        interests = [genre_index[g] for g in example["interests"]]  # (T,)
        weights = np.asarray(example["interest_weights"], dtype=np.float64)  # (T,)
        # in_genre[t, k]: candidate k is a (valid) item of interest genre t.
        in_genre = np.array(
            [[j is not None and g in self.catalogue.item_genres[j] for j in items] for g in interests],
            dtype=bool,
        ).reshape(len(interests), len(items))  # (T, K)
        if self.game_name == "coverage":
            hits = in_genre & (cand_rel >= self.coverage_threshold)[None, :]  # (T, K)
            return coverage(hits, weights=weights)
        scores = np.where(in_genre, cand_rel[None, :], 0.0)  # (T, K)
        return SumOfMaxGame(scores=scores, weights=weights, floors=np.zeros(len(interests)))

    def utility(self, completion: str, example: Mapping[str, Any]) -> float:
        """Set utility U(first K candidates) of one completion (a convenience for evaluation and tests)."""
        cands = self.parse(completion)[: self.num_candidates]
        g = self.game(cands, example)
        return float(g.value(np.ones((1, len(cands)), dtype=bool))[0])

    def item_gains(self, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The game of *every* catalogue item as a candidate: weights (T,) and gains (T, num_items), so that
        U(S) = sum_t w_t max_{j in S} y_tj for any set S of distinct items (history items gain 0). The same
        numbers :meth:`game` uses; :func:`reference_levels` searches sets with them."""
        rel = np.array(example["relevance"], dtype=np.float64)  # (I,)
        rel[[self._item_index[t] for t in example["history"]]] = 0.0
        if self.game_name == "best_of_set":
            return np.ones(1), rel[None, :]
        genre_index = {g: k for k, g in enumerate(self.catalogue.genres)}
        in_genre = np.array(
            [[genre_index[g] in gs for gs in self.catalogue.item_genres] for g in example["interests"]],
            dtype=bool,
        ).reshape(len(example["interests"]), self.catalogue.num_items)  # (T, I)
        weights = np.asarray(example["interest_weights"], dtype=np.float64)  # (T,)
        if self.game_name == "coverage":
            return weights, (in_genre & (rel >= self.coverage_threshold)[None, :]).astype(np.float64)
        return weights, np.where(in_genre, rel[None, :], 0.0)

    def reference_levels(self, dataset: datasets.Dataset, **kwargs: Any) -> dict[str, float]:
        """Random, best prompt-independent and oracle set utility on ``dataset`` (see
        :func:`reference_levels`)."""
        return reference_levels(self, dataset, **kwargs)

    def format_valid(self, completion: str) -> bool:
        """Exactly K distinct candidates, each an item of the catalogue (history items are allowed: they are a
        preference error, not a format error)."""
        texts = [c.text.strip() for c in self.parse(completion)]
        return (
            len(texts) == self.num_candidates
            and len(set(texts)) == len(texts)
            and all(t in self._item_index for t in texts)
        )

    # ----------------------------------------------------------------------------------------- warm start

    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        """Prompts of random train users, completions of K random distinct items not in the history: the
        format, not the preferences (the items ignore the user's interests)."""
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        rng = np.random.default_rng(seed)
        users = self.users["train"]
        prompts, completions = [], []
        for u in rng.integers(0, len(users), size=num):
            user = users[int(u)]
            seen = set(user.history)
            allowed = np.array([j for j in range(self.catalogue.num_items) if j not in seen])
            items = rng.choice(allowed, size=self.num_candidates, replace=False)
            prompts.append(self.row(user)["prompt"])
            completions.append(format_completion_text([item_token(int(j)) for j in items]))
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})

    def vocabulary(self) -> list[str]:
        words = [
            *self.catalogue.tokens,
            *self.catalogue.genres,
            *PROMPT_WORDS,
            str(self.num_candidates),
            *PUNCTUATION,
        ]
        return list(dict.fromkeys(words))  # de-duplicated, order kept


# ----------------------------------------------------------------------------------------- presets

# Named benchmark worlds (docs/tasks.md, "Presets"). "legacy" is the constructor's defaults: 60 items in 8
# genres, where a small policy learns which items are good in general but not what the prompt says.
# "interests" is a world where the prompt decides: 24 items in 4 genres, each user likes 2 of them with
# different strengths (the history shows both, one item each, the rest by strength) and has seen 4 items
# (worth 0). Measured on 100 eval users, K = 4 (random / best prompt-independent set / oracle): best-of-set
# 0.48 / 0.78 / 0.86, coverage 0.31 / 0.63 / 0.92. "interests_k8" is the free-rider arm: the same world with
# K = 8 slots for at most 8 unseen items of a user's genres (best-of-set 0.67 / 0.86 / 0.86: here a fixed set
# is as good as the oracle; coverage 0.54 / 0.86 / 0.92).
_INTERESTS = {
    "num_items": 24,
    "num_genres": 4,
    "num_interests": 2,
    "history_len": 4,
    "coverage_threshold": 0.5,
}
PRESETS: dict[str, dict[str, Any]] = {
    "legacy": {},
    "interests": _INTERESTS | {"num_candidates": 4},
    "interests_k8": _INTERESTS | {"num_candidates": 8},
}


def _set_values(weights: np.ndarray, gains: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """U of each set for each user: weights (U, T), gains (U, T, I), sets (M, K) item indices -> (U, M)."""
    picked = gains[:, :, sets]  # (U, T, M, K)
    return np.einsum("ut,utm->um", weights, picked.max(axis=-1))


def _mean_values(weights: np.ndarray, gains: np.ndarray, sets: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Mean U over users of each set, (M,), in chunks of sets (memory U·T·chunk·K, not U·T·M·K)."""
    return np.concatenate(
        [_set_values(weights, gains, sets[i : i + chunk]).mean(axis=0) for i in range(0, len(sets), chunk)]
    )


def _greedy_best(weights: np.ndarray, gains: np.ndarray, k: int) -> list[int]:
    """Greedy (then 1-swap local search) set of k items maximising the users' mean U."""
    chosen: list[int] = []
    items = range(gains.shape[-1])
    while len(chosen) < k:
        rest = [j for j in items if j not in chosen]
        cand = np.array([[*chosen, j] for j in rest])  # (M, |chosen| + 1)
        chosen.append(rest[int(_mean_values(weights, gains, cand).argmax())])
    best = float(_mean_values(weights, gains, np.array([chosen]))[0])
    improved = True
    while improved:  # 1-swap local search: greedy is not optimal for coverage in general
        improved = False
        for pos in range(k):
            rest = [j for j in items if j not in chosen]
            cand = np.array([[*chosen[:pos], j, *chosen[pos + 1 :]] for j in rest])
            vals = _mean_values(weights, gains, cand)
            if vals.max() > best + 1e-12:
                chosen, best, improved = cand[int(vals.argmax())].tolist(), float(vals.max()), True
    return chosen


def reference_levels(
    task: RecsysTask,
    dataset: datasets.Dataset,
    *,
    seed: int = 0,
    random_draws: int = 256,
    max_exhaustive_sets: int = 20_000,
) -> dict[str, float]:
    """Mean set utility over ``dataset``'s users of three reference policies (docs/tasks.md, "Presets"):

    random: K distinct items uniform over the catalogue (history items included: a random policy does not
      read the prompt), ``random_draws`` draws per user with ``seed``;
    prompt_independent: the best single set recommended to every user (exhaustive when there are at most
      ``max_exhaustive_sets`` sets, else greedy with 1-swap local search: a lower bound);
    oracle: the best set per user (exact: one best item per target when K >= T targets, else greedy).
    The fourth reference, the warm start, is the policy's own step-0 evaluation.
    """
    if len(dataset) == 0:
        raise ValueError("reference_levels needs at least one user")
    pairs = [task.item_gains(row) for row in dataset]
    weights = np.stack([w for w, _ in pairs])  # (U, T)
    gains = np.stack([y for _, y in pairs])  # (U, T, I)
    k, num_items = task.num_candidates, task.catalogue.num_items
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((random_draws, num_items)), axis=1)[:, :k]  # (D, K) distinct items
    random_level = float(_set_values(weights, gains, draws).mean())
    if math.comb(num_items, k) <= max_exhaustive_sets:
        sets = np.array(list(itertools.combinations(range(num_items), k)))  # (M, K)
        independent = float(_mean_values(weights, gains, sets).max())
    else:
        independent = float(_mean_values(weights, gains, np.array([_greedy_best(weights, gains, k)]))[0])
    if k >= gains.shape[1]:
        oracle = float(np.einsum("ut,ut->u", weights, gains.max(axis=-1)).mean())
    else:
        per_user = [_greedy_best(weights[u : u + 1], gains[u : u + 1], k) for u in range(len(pairs))]
        oracle = float(
            np.mean(
                [
                    _set_values(weights[u : u + 1], gains[u : u + 1], np.array([s]))[0, 0]
                    for u, s in enumerate(per_user)
                ]
            )
        )
    return {"random": random_level, "prompt_independent": independent, "oracle": oracle}


__all__ = [
    "GAMES",
    "PRESETS",
    "Catalogue",
    "RecsysTask",
    "UserRecord",
    "affinity",
    "format_completion_text",
    "format_prompt_text",
    "genre_word",
    "item_token",
    "make_catalogue",
    "make_user",
    "movielens_world",
    "reference_levels",
    "relevance",
]
