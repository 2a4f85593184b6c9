"""Reader for user-supplied MovieLens-format files, and the per-user split into history and held-out ratings.

Two layouts are understood (no download: the user points at a folder they already have):

* ``latest`` (ml-latest-small, ml-25m, ...): ``ratings.csv`` with ``userId,movieId,rating,timestamp`` and
  ``movies.csv`` with ``movieId,title,genres`` where genres are ``|``-separated.
* ``100k`` (ml-100k): ``u.data`` with tab-separated ``user item rating timestamp`` and ``u.item`` with
  ``|``-separated ``id|title|release|video release|url|<19 binary genre flags>``; the genre names come from
  ``u.genre`` when present, else the standard ml-100k list.

Rules the reader applies (docs/data.md has the long form):

* Encodings: with ``encoding=None`` every file is decoded as UTF-8 (a byte-order mark is dropped) and, when
  that fails, as latin-1 (the encoding of the classic ``u.item`` and of old ``movies.csv`` files); the
  encoding used per file is in :attr:`MovieLensData.encodings`. An explicit ``encoding=`` is used for every
  file, strictly: bytes it cannot decode are an error naming the file and line.
* Separators inside titles are kept: ``u.item`` has a fixed number of fields after the title, so the fields
  between the id and those are the title (re-joined with ``|``); an unquoted comma in a ``movies.csv`` title
  is re-joined the same way (the id is first, the genres last and genre names hold no comma).
* Duplicates and re-ratings: one rating per (user, movie) is kept, the one with the latest timestamp; among
  equal timestamps the row read last wins. Dropped rows are counted: exact copies of another row in
  :attr:`MovieLensData.num_duplicates`, superseded distinct ratings in :attr:`MovieLensData.num_reratings`.
  So a user's held-out movies are never in their history and no history holds a movie twice.
* Every malformed line is a :class:`MovieLensFormatError` (a ``ValueError``) naming the file, the line and the
  field.

Relevance comes from held-out ratings: per user, ratings sorted by time, the last ``holdout`` ratings are held
out and every earlier rating is history. The relevance of a held-out item is rating / 5; every other item has
relevance 0 (the user was not observed to like it, so recommending it earns nothing).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
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
# The files of each layout that must be present (the sensor waits for all of them).
LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    "latest": ("ratings.csv", "movies.csv"),
    "100k": ("u.data", "u.item"),
}
# Fields of u.item after the title: release date, video release date, IMDb URL (then the genre flags).
_ITEM_FIELDS_AFTER_TITLE = 3
# Tried in order when no encoding is given: UTF-8 (BOM dropped), then latin-1, which decodes any byte.
AUTO_ENCODINGS = ("utf-8-sig", "latin-1")


class MovieLensFormatError(ValueError):
    """A malformed MovieLens file: the message names the file, the line (1-based) and the field."""

    def __init__(self, file: Path, line: int | None, message: str, field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = (
            str(file)
            + (f" line {line}" if line is not None else "")
            + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {message}")


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
    """Everything read from one MovieLens folder, after the one-rating-per-(user, movie) rule."""

    movies: dict[int, Movie]  # movie_id -> Movie, every movie in the movies file
    ratings: tuple[Rating, ...]  # one per (user, movie), in file order of the kept rows
    layout: Literal["latest", "100k"]
    num_rating_rows: int = 0  # rating rows read (before dropping duplicates and re-ratings)
    num_duplicates: int = 0  # dropped exact copies of another row (same user, movie, rating, timestamp)
    num_reratings: int = 0  # dropped distinct ratings superseded by a later one of the same (user, movie)
    encodings: dict[str, str] = field(default_factory=dict)  # file name -> encoding it was decoded with


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
    for layout, files in LAYOUT_FILES.items():
        if all((path / name).is_file() for name in files):
            return layout  # type: ignore[return-value]
    raise ValueError(
        f"{str(path)!r} holds neither ratings.csv + movies.csv (ml-latest layout) "
        "nor u.data + u.item (ml-100k layout)"
    )


# --------------------------------------------------------------------------------------------- decoding


def decode_file(path: Path, encoding: str | None = None) -> tuple[str, str]:
    """The text of ``path`` and the encoding that decoded it (see the module docstring for the rule)."""
    raw = path.read_bytes()
    if encoding is not None:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise MovieLensFormatError(
                path,
                line,
                f"byte {raw[e.start : e.start + 1]!r} is not valid {encoding} (the encoding= given)",
            ) from e
        except LookupError as e:
            raise ValueError(f"unknown encoding {encoding!r} for {path}") from e
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"  # never fails: every byte is a latin-1 character


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) splitting on newlines only; str.splitlines would also split inside a
    latin-1 title on \x85 or \x1c."""
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line.rstrip("\r")


def _int(value: str, file: Path, line: int, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise MovieLensFormatError(file, line, f"expected an integer, got {value!r}", name) from None


def _rating(value: str, file: Path, line: int, name: str) -> float:
    try:
        x = float(value.strip())
    except ValueError:
        raise MovieLensFormatError(file, line, f"expected a number, got {value!r}", name) from None
    if not (math.isfinite(x) and 0.0 <= x <= MAX_RATING):
        raise MovieLensFormatError(file, line, f"rating must lie in [0, {MAX_RATING}], got {value!r}", name)
    return x


def _clean_genres(names: list[str]) -> tuple[str, ...]:
    return tuple(g for g in (n.strip() for n in names) if g and g not in NO_GENRE)


def _add_movie(movies: dict[int, Movie], lines: dict[int, int], movie: Movie, file: Path, line: int) -> None:
    if movie.movie_id in movies:
        raise MovieLensFormatError(
            file,
            line,
            f"movie id {movie.movie_id} already defined on line {lines[movie.movie_id]}",
            "movieId",
        )
    movies[movie.movie_id], lines[movie.movie_id] = movie, line


# ------------------------------------------------------------------------------------------ the layouts


@dataclass
class _RatingRows:
    """The rating rows of one file, with the line of each (for error messages after parsing)."""

    file: Path
    ratings: list[Rating] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def _csv_rows(
    file: Path, text: str, required: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, int], list[str]]]:
    """(line, column index by name, fields) of each non-empty data row of a CSV file with a header."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise MovieLensFormatError(file, 1, f"empty file; expected the header {','.join(required)}")
    columns = {name.strip(): i for i, name in enumerate(header)}
    missing = [c for c in required if c not in columns]
    if missing:
        raise MovieLensFormatError(file, 1, f"lacks columns {missing} (header: {header})")
    while True:
        try:
            row = next(reader, None)
        except csv.Error as e:  # e.g. a NUL byte or an over-long quoted field
            raise MovieLensFormatError(file, reader.line_num, f"unreadable CSV: {e}") from None
        if row is None:
            return
        if any(f.strip() for f in row):
            yield reader.line_num, columns, row


def _field(row: list[str], col: dict[str, int], name: str, extra: int) -> str:
    """Column ``name`` of a movies.csv row whose title was split into ``1 + extra`` fields."""
    i = col[name]
    return row[i] if i < col["title"] else row[i + extra]


def _read_latest(path: Path, encoding: str | None) -> tuple[dict[int, Movie], _RatingRows, dict[str, str]]:
    encodings: dict[str, str] = {}
    file = path / "movies.csv"
    text, encodings[file.name] = decode_file(file, encoding)
    movies: dict[int, Movie] = {}
    defined: dict[int, int] = {}
    required = ("movieId", "title", "genres")
    for line, col, row in _csv_rows(file, text, required):
        if len(row) < len(col):
            raise MovieLensFormatError(file, line, f"expected {len(col)} fields, got {len(row)}: {row}")
        # An unquoted comma splits the title: the fields from the title column up to the ones after it are
        # the title (the other columns, ids and '|'-separated genres, hold no comma).
        extra, t = len(row) - len(col), col["title"]

        title = ",".join(row[t : t + 1 + extra])
        movie_id = _int(_field(row, col, "movieId", extra), file, line, "movieId")
        movie = Movie(movie_id, title, _clean_genres(_field(row, col, "genres", extra).split("|")))
        _add_movie(movies, defined, movie, file, line)
    file = path / "ratings.csv"
    text, encodings[file.name] = decode_file(file, encoding)
    rows = _RatingRows(file)
    required = ("userId", "movieId", "rating", "timestamp")
    for line, col, row in _csv_rows(file, text, required):
        if len(row) != len(col):
            raise MovieLensFormatError(file, line, f"expected {len(col)} fields, got {len(row)}: {row}")
        rating = Rating(
            _int(row[col["userId"]], file, line, "userId"),
            _int(row[col["movieId"]], file, line, "movieId"),
            _rating(row[col["rating"]], file, line, "rating"),
            _int(row[col["timestamp"]], file, line, "timestamp"),
        )
        rows.ratings.append(rating)
        rows.lines.append(line)
    return movies, rows, encodings


def _read_100k(path: Path, encoding: str | None) -> tuple[dict[int, Movie], _RatingRows, dict[str, str]]:
    encodings: dict[str, str] = {}
    genre_names = list(ML100K_GENRES)
    file = path / "u.genre"
    if file.is_file():
        # u.genre lines are "name|index"; order by index.
        text, encodings[file.name] = decode_file(file, encoding)
        pairs = []
        for line, content in _lines(text):
            if content.strip():
                name, sep, idx = content.rpartition("|")
                if not sep:
                    raise MovieLensFormatError(file, line, f"expected 'name|index', got {content!r}")
                pairs.append((_int(idx, file, line, "index"), name))
        genre_names = [name for _, name in sorted(pairs)]
    num_genres = len(genre_names)
    file = path / "u.item"
    text, encodings[file.name] = decode_file(file, encoding)
    movies: dict[int, Movie] = {}
    defined: dict[int, int] = {}
    min_fields = 2 + _ITEM_FIELDS_AFTER_TITLE + num_genres
    for line, content in _lines(text):
        if not content.strip():
            continue
        fields = content.split("|")
        flags = fields[-num_genres:]
        if len(fields) < min_fields:
            raise MovieLensFormatError(
                file,
                line,
                f"expected {min_fields} '|'-separated fields "
                f"(id|title|release|video release|url|{num_genres} 0/1 genre flags), got {len(fields)}",
            )
        bad = next((i for i, f in enumerate(flags) if f.strip() not in ("0", "1")), None)
        if bad is not None:
            raise MovieLensFormatError(
                file, line, f"genre flag must be 0 or 1, got {flags[bad]!r}", f"genre {genre_names[bad]}"
            )
        # Fixed fields on both ends, so a '|' inside the title leaves it whole.
        title = "|".join(fields[1 : len(fields) - _ITEM_FIELDS_AFTER_TITLE - num_genres])
        genres = _clean_genres([g for g, f in zip(genre_names, flags, strict=True) if f.strip() == "1"])
        movie_id = _int(fields[0], file, line, "movie id")
        _add_movie(movies, defined, Movie(movie_id, title, genres), file, line)
    file = path / "u.data"
    text, encodings[file.name] = decode_file(file, encoding)
    rows = _RatingRows(file)
    for line, content in _lines(text):
        if not content.strip():
            continue
        fields = content.split()
        if len(fields) != 4:
            raise MovieLensFormatError(
                file, line, f"expected 4 fields 'user item rating timestamp', got {len(fields)}: {content!r}"
            )
        rating = Rating(
            _int(fields[0], file, line, "user id"),
            _int(fields[1], file, line, "item id"),
            _rating(fields[2], file, line, "rating"),
            _int(fields[3], file, line, "timestamp"),
        )
        rows.ratings.append(rating)
        rows.lines.append(line)
    return movies, rows, encodings


# ------------------------------------------------------------------------------------ duplicate rule


@dataclass(frozen=True)
class Deduplicated:
    """Ratings after the one-per-(user, movie) rule, and what the rule dropped."""

    ratings: tuple[Rating, ...]
    num_duplicates: int  # dropped exact copies: rows whose (rating, timestamp) another row of the pair has
    num_reratings: int  # dropped distinct ratings superseded by a later (equal timestamp: later-read) one


def dedupe_ratings(ratings: list[Rating] | tuple[Rating, ...]) -> Deduplicated:
    """Keep one rating per (user, movie): the latest timestamp, ties -> the last in ``ratings`` order.

    Of the dropped rows, exact copies (same rating and timestamp as another row of the pair) count as
    duplicates, the other distinct ratings as re-ratings. The kept ratings are in the order of each pair's
    first row.
    """
    kept: dict[tuple[int, int], Rating] = {}  # a replaced value keeps its key's first position
    repeated: dict[tuple[int, int], list[Rating]] = {}  # every row of the pairs seen more than once
    for r in ratings:
        key = (r.user_id, r.movie_id)
        old = kept.get(key)
        if old is None:
            kept[key] = r
            continue
        repeated.setdefault(key, [old]).append(r)
        if r.timestamp >= old.timestamp:  # ">=": at an equal timestamp the later row wins
            kept[key] = r
    duplicates = reratings = 0
    for group in repeated.values():
        distinct = len({(r.rating, r.timestamp) for r in group})
        duplicates += len(group) - distinct
        reratings += distinct - 1
    return Deduplicated(tuple(kept.values()), duplicates, reratings)


def read_movielens(path: str | Path, layout: Layout = "auto", encoding: str | None = None) -> MovieLensData:
    """Read a MovieLens folder (rules in the module docstring).

    ``encoding=None`` tries UTF-8 then latin-1 per file; a given ``encoding`` is used strictly for every file.
    Malformed lines are :class:`MovieLensFormatError`; a rating of a movie missing from the movies file is one
    too, naming the rating's file and line.
    """
    path = Path(path)
    resolved = detect_layout(path) if layout == "auto" else layout
    if resolved == "latest":
        movies, rows, encodings = _read_latest(path, encoding)
    elif resolved == "100k":
        movies, rows, encodings = _read_100k(path, encoding)
    else:
        raise ValueError(f"unknown MovieLens layout {layout!r}; use 'auto', 'latest' or '100k'")
    for rating, line in zip(rows.ratings, rows.lines, strict=True):
        if rating.movie_id not in movies:
            raise MovieLensFormatError(
                rows.file, line, f"movie id {rating.movie_id} is absent from the movies file", "movieId"
            )
    deduped = dedupe_ratings(rows.ratings)
    return MovieLensData(
        movies=movies,
        ratings=deduped.ratings,
        layout=resolved,
        num_rating_rows=len(rows.ratings),
        num_duplicates=deduped.num_duplicates,
        num_reratings=deduped.num_reratings,
        encodings=encodings,
    )


def split_by_time(
    ratings: tuple[Rating, ...] | list[Rating], holdout: int, min_history: int = 1
) -> list[UserSplit]:
    """Per user (ascending user id): sort by (timestamp, movie id), hold out the last ``holdout`` ratings.

    Users with fewer than ``min_history + holdout`` ratings are skipped (they cannot have both a history and a
    full held-out set). Ties in timestamp are broken by movie id so that the split is deterministic. A user
    who rated a movie twice is a ValueError (apply :func:`dedupe_ratings` first, as :func:`read_movielens`
    does): otherwise the same movie could be both history and held out.
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
        repeated = [m for m, n in Counter(r.movie_id for r in rs).items() if n > 1]
        if repeated:
            raise ValueError(
                f"user {user_id} rated movie(s) {sorted(repeated)[:10]} more than once; dedupe_ratings first"
            )
        if len(rs) < min_history + holdout:
            continue
        splits.append(UserSplit(user_id, tuple(rs[:-holdout]), tuple(rs[-holdout:])))
    return splits


def item_rating_counts(ratings: tuple[Rating, ...] | list[Rating]) -> Counter[int]:
    """Number of ratings per movie id."""
    return Counter(r.movie_id for r in ratings)
