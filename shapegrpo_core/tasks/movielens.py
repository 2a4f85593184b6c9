"""Reader for user-supplied MovieLens-format files, and the per-user split into history and held-out ratings.

Two layouts are understood (no download: the user points at a folder they already have):

* ``latest`` (ml-latest-small, ml-25m, ...): ``ratings.csv`` with ``userId,movieId,rating,timestamp`` and
  ``movies.csv`` with ``movieId,title,genres`` where genres are ``|``-separated.
* ``100k`` (ml-100k): ``u.data`` with tab-separated ``user item rating timestamp`` and ``u.item`` with
  ``|``-separated ``id|title|release|video release|url|<19 binary genre flags>`` in latin-1; the genre names
  come from ``u.genre`` when present, else the standard ml-100k list.

Relevance comes from held-out ratings (docs/tasks.md): per user, ratings sorted by time, the last ``holdout``
ratings are held out and every earlier rating is history. The relevance of a held-out item is rating / 5;
every other item has relevance 0 (the user was not observed to like it, so recommending it earns nothing).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Layout = Literal["auto", "latest", "100k"]

# The 19 genre flags of ml-100k's u.item, in file order (used when u.genre is absent).
ML100K_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# Placeholder genres that say "no genre": an item tagged only with these has no genre.
NO_GENRE = frozenset({"unknown", "(no genres listed)"})
MAX_RATING = 5.0


@dataclass(frozen=True)
class Rating:
    user_id: int
    movie_id: int
    rating: float
    timestamp: int


@dataclass(frozen=True)
class Movie:
    movie_id: int
    title: str
    genres: tuple[str, ...]  # original genre names, placeholders removed


@dataclass(frozen=True)
class MovieLensData:
    """Everything read from one MovieLens folder."""

    movies: dict[int, Movie]  # movie_id -> Movie, every movie in the movies file
    ratings: tuple[Rating, ...]
    layout: Literal["latest", "100k"]


@dataclass(frozen=True)
class UserSplit:
    """One user's ratings split by time: ``history`` (oldest first) then the held-out ``heldout`` ratings."""

    user_id: int
    history: tuple[Rating, ...]
    heldout: tuple[Rating, ...]


def detect_layout(path: str | Path) -> Literal["latest", "100k"]:
    """Which MovieLens layout the folder ``path`` holds."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"MovieLens path {str(path)!r} is not a directory")
    if (path / "ratings.csv").is_file() and (path / "movies.csv").is_file():
        return "latest"
    if (path / "u.data").is_file() and (path / "u.item").is_file():
        return "100k"
    raise ValueError(
        f"{str(path)!r} holds neither ratings.csv + movies.csv (ml-latest layout) "
        "nor u.data + u.item (ml-100k layout)"
    )


def _clean_genres(names: list[str]) -> tuple[str, ...]:
    return tuple(g for g in (n.strip() for n in names) if g and g not in NO_GENRE)


def _read_latest(path: Path) -> tuple[dict[int, Movie], list[Rating]]:
    movies: dict[int, Movie] = {}
    with open(path / "movies.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"movieId", "title", "genres"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"movies.csv lacks columns {sorted(missing)} (header: {reader.fieldnames})")
        for row in reader:
            movie_id = int(row["movieId"])
            movies[movie_id] = Movie(movie_id, row["title"], _clean_genres(row["genres"].split("|")))
    ratings: list[Rating] = []
    with open(path / "ratings.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"userId", "movieId", "rating", "timestamp"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"ratings.csv lacks columns {sorted(missing)} (header: {reader.fieldnames})")
        for row in reader:
            ratings.append(
                Rating(int(row["userId"]), int(row["movieId"]), float(row["rating"]), int(row["timestamp"]))
            )
    return movies, ratings


def _read_100k(path: Path) -> tuple[dict[int, Movie], list[Rating]]:
    genre_names = list(ML100K_GENRES)
    if (path / "u.genre").is_file():
        # u.genre lines are "name|index"; order by index.
        pairs = []
        for line in (path / "u.genre").read_text(encoding="latin-1").splitlines():
            if line.strip():
                name, idx = line.rsplit("|", 1)
                pairs.append((int(idx), name))
        genre_names = [name for _, name in sorted(pairs)]
    movies: dict[int, Movie] = {}
    for lineno, line in enumerate((path / "u.item").read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[-len(genre_names) :]
        if len(fields) < 2 + len(genre_names) or any(f not in ("0", "1") for f in flags):
            raise ValueError(
                f"u.item line {lineno}: expected id|title|...|{len(genre_names)} 0/1 genre flags"
            )
        genres = _clean_genres([g for g, flag in zip(genre_names, flags, strict=True) if flag == "1"])
        movies[int(fields[0])] = Movie(int(fields[0]), fields[1], genres)
    ratings: list[Rating] = []
    for lineno, line in enumerate((path / "u.data").read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise ValueError(f"u.data line {lineno}: expected 'user item rating timestamp', got {line!r}")
        ratings.append(Rating(int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])))
    return movies, ratings


def read_movielens(path: str | Path, layout: Layout = "auto") -> MovieLensData:
    """Read a MovieLens folder. Ratings of movies missing from the movies file are a ValueError."""
    path = Path(path)
    resolved = detect_layout(path) if layout == "auto" else layout
    if resolved == "latest":
        movies, ratings = _read_latest(path)
    elif resolved == "100k":
        movies, ratings = _read_100k(path)
    else:
        raise ValueError(f"unknown MovieLens layout {layout!r}; use 'auto', 'latest' or '100k'")
    unknown = sorted({r.movie_id for r in ratings} - movies.keys())
    if unknown:
        raise ValueError(f"ratings refer to movie ids absent from the movies file: {unknown[:10]}")
    bad = [r for r in ratings if not 0.0 <= r.rating <= MAX_RATING]
    if bad:
        raise ValueError(f"ratings must lie in [0, {MAX_RATING}]; first bad one: {bad[0]}")
    return MovieLensData(movies=movies, ratings=tuple(ratings), layout=resolved)


def split_by_time(
    ratings: tuple[Rating, ...] | list[Rating], holdout: int, min_history: int = 1
) -> list[UserSplit]:
    """Per user (ascending user id): sort by (timestamp, movie id), hold out the last ``holdout`` ratings.

    Users with fewer than ``min_history + holdout`` ratings are skipped (they cannot have both a history and a
    full held-out set). Ties in timestamp are broken by movie id so that the split is deterministic.
    """
    if holdout < 1:
        raise ValueError(f"holdout must be >= 1, got {holdout}")
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1, got {min_history}")
    by_user: dict[int, list[Rating]] = defaultdict(list)
    for r in ratings:
        by_user[r.user_id].append(r)
    splits = []
    for user_id in sorted(by_user):
        rs = sorted(by_user[user_id], key=lambda r: (r.timestamp, r.movie_id))
        if len(rs) < min_history + holdout:
            continue
        splits.append(UserSplit(user_id, tuple(rs[:-holdout]), tuple(rs[-holdout:])))
    return splits


def item_rating_counts(ratings: tuple[Rating, ...] | list[Rating]) -> Counter[int]:
    """Number of ratings per movie id."""
    return Counter(r.movie_id for r in ratings)
