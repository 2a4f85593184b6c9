"""MovieLens-format files (ml-latest and ml-100k layouts) -> histories, held-out relevance, the task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shapegrpo_core.tasks import movielens
from shapegrpo_core.tasks.recsys import RecsysTask

# (movieId, title, genres); movie 50 is never rated, movie 40 has no genre.
MOVIES = [
    (10, "Toy Story (1995)", ["Adventure", "Animation"]),
    (20, "Heat (1995)", ["Action", "Crime"]),
    (30, "Sense and Sensibility, Part 1 (1995)", ["Drama", "Romance"]),  # a comma in the title
    (40, "Café Society (1995)", []),  # non-ASCII title (latin-1 in ml-100k)
    (50, "Unrated (1995)", ["Comedy"]),
]
# (userId, movieId, rating, timestamp); written in a shuffled order on purpose.
RATINGS = [
    (1, 30, 5.0, 200),
    (1, 20, 3.0, 50),
    (1, 40, 2.0, 300),
    (1, 10, 4.0, 100),
    (2, 30, 1.0, 30),
    (2, 10, 5.0, 10),
    (2, 20, 4.0, 20),
    (3, 10, 3.0, 5),  # a single rating: no history once one rating is held out
    (4, 20, 5.0, 7),  # two ratings with the same timestamp: ties broken by movie id
    (4, 10, 4.0, 7),
]


def write_latest(root: Path, movies: list = MOVIES, ratings: list = RATINGS) -> Path:
    """ml-latest-small layout: ratings.csv + movies.csv (genres "|"-separated, "(no genres listed)")."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["movieId,title,genres"]
    for mid, title, genres in movies:
        quoted = f'"{title}"' if "," in title else title
        lines.append(f"{mid},{quoted},{'|'.join(genres) or '(no genres listed)'}")
    (root / "movies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"{u},{m},{r},{t}" for u, m, r, t in ratings]
    (root / "ratings.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_100k(
    root: Path, with_genre_file: bool = True, movies: list = MOVIES, ratings: list = RATINGS
) -> Path:
    """ml-100k layout: u.data (tabs) + u.item (pipes, 19 genre flags, latin-1) [+ u.genre]."""
    root.mkdir(parents=True, exist_ok=True)
    names = movielens.ML100K_GENRES
    lines = []
    for mid, title, genres in movies:
        flags = ["1" if g in genres else "0" for g in names]
        if not genres:
            flags[0] = "1"  # ml-100k marks genre-less movies "unknown"
        lines.append("|".join([str(mid), title, "01-Jan-1995", "", "http://example.invalid/x", *flags]))
    (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    data = [f"{u}\t{m}\t{int(r)}\t{t}" for u, m, r, t in ratings]
    (root / "u.data").write_text("\n".join(data) + "\n")
    if with_genre_file:
        (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(names)) + "\n")
    return root


@pytest.fixture(params=["latest", "100k", "100k-no-genre-file"])
def ml_dir(request, tmp_path) -> Path:
    if request.param == "latest":
        return write_latest(tmp_path / "ml-latest-small")
    return write_100k(tmp_path / "ml-100k", with_genre_file=request.param == "100k")


def test_read_both_layouts(ml_dir: Path) -> None:
    data = movielens.read_movielens(ml_dir)
    assert data.layout == ("latest" if (ml_dir / "movies.csv").exists() else "100k")
    assert set(data.movies) == {10, 20, 30, 40, 50}
    assert data.movies[30].title == "Sense and Sensibility, Part 1 (1995)"
    assert data.movies[40].title == "Café Society (1995)" and data.movies[40].genres == ()
    assert data.movies[10].genres == ("Adventure", "Animation")
    assert sorted((r.user_id, r.movie_id, r.rating, r.timestamp) for r in data.ratings) == sorted(RATINGS)


def test_split_by_time() -> None:
    ratings = [movielens.Rating(u, m, r, t) for u, m, r, t in RATINGS]
    splits = movielens.split_by_time(ratings, holdout=1)
    assert [s.user_id for s in splits] == [1, 2, 4]  # user 3 has no history left
    s1 = splits[0]
    assert [r.movie_id for r in s1.history] == [20, 10, 30] and [r.movie_id for r in s1.heldout] == [40]
    assert [r.movie_id for r in splits[2].history] == [10] and splits[2].heldout[0].movie_id == 20
    two = movielens.split_by_time(ratings, holdout=2)
    assert [s.user_id for s in two] == [1, 2]
    assert [r.movie_id for r in two[0].heldout] == [30, 40]
    with pytest.raises(ValueError, match="holdout"):
        movielens.split_by_time(ratings, holdout=0)


def test_task_from_movielens(ml_dir: Path) -> None:
    task = RecsysTask.from_movielens(ml_dir, holdout=1, history_len=2, num_candidates=2, eval_fraction=0.34)
    cat = task.catalogue
    # Movie 50 is never rated, so it is not an item; items follow movieId order.
    assert cat.source_ids == (10, 20, 30, 40) and cat.num_items == 4
    assert cat.genres == ("action", "adventure", "animation", "crime", "drama", "romance")
    assert cat.item_genres[3] == ()
    rows = {r["user_id"]: r for split in ("train", "eval") for r in task.build_dataset(split, 0)}
    assert set(rows) == {1, 2, 4} and len(task.users["eval"]) == 1
    u1 = rows[1]
    # user 1 by time: 20 (t50), 10 (t100), 30 (t200) | held out: 40 (t300, 2 stars). Prompt shows the last 2.
    assert u1["history"] == ["i0", "i2"] and u1["prompt"] == "history: i0 i2 -> recommend 2:"
    np.testing.assert_allclose(u1["relevance"], [0.0, 0.0, 0.0, 0.4])
    # Interests over all earlier ratings weighted by rating/5: drama = romance = 1.0 > adventure = ... = 0.8.
    assert u1["interests"] == ["drama", "romance"] and u1["interest_weights"] == pytest.approx([0.5, 0.5])
    u2 = rows[2]
    assert u2["history"] == ["i0", "i1"]
    np.testing.assert_allclose(u2["relevance"], [0.0, 0.0, 0.2, 0.0])
    np.testing.assert_allclose(rows[4]["relevance"], [0.0, 1.0, 0.0, 0.0])

    assert task.utility(" i3, i1", u1) == pytest.approx(0.4)
    assert task.utility(" i0, i1", u1) == 0.0  # i0 is in the shown history; i1 was not held out
    assert task.format_valid(" i3, i1") and not task.format_valid(" i3, i3")
    demos = task.demonstrations(10, seed=0)
    assert all(task.format_valid(c) for c in demos["completion"])


def test_both_layouts_build_the_same_task(tmp_path: Path) -> None:
    kw = dict(holdout=1, history_len=3, num_candidates=1, seed=5)
    a = RecsysTask.from_movielens(write_latest(tmp_path / "a"), **kw)
    b = RecsysTask.from_movielens(write_100k(tmp_path / "b"), **kw)
    assert a.catalogue == b.catalogue
    for split in ("train", "eval"):
        assert a.build_dataset(split, 0).to_list() == b.build_dataset(split, 0).to_list()


def test_coverage_on_movielens(tmp_path: Path) -> None:
    root = write_latest(tmp_path / "ml")
    task = RecsysTask.from_movielens(root, holdout=2, history_len=5, num_candidates=2, game="coverage")
    assert task.coverage_threshold == 0.7  # 3.5 stars
    rows = {r["user_id"]: r for split in ("train", "eval") for r in task.build_dataset(split, 0)}
    # user 1 holds out 30 (5 stars, drama|romance) and 40 (2 stars); interests from 20 and 10 (tie, 4 genres).
    u1 = rows[1]
    assert u1["history"] == ["i1", "i0"] and u1["interests"] == ["adventure", "animation"]
    assert task.utility(" i2, i3", u1) == 0.0  # the 5-star drama is not an interest genre here
    best = RecsysTask.from_movielens(root, holdout=2, num_candidates=2, game="best_of_set")
    assert best.utility(" i2", u1) == 1.0


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "neither"),
        ("unknown_movie", "absent from the movies file"),
        ("bad_header", "lacks columns"),
        ("bad_item_line", "u.item line 1"),
    ],
)
def test_bad_files_raise(tmp_path: Path, setup: str, match: str) -> None:
    root = tmp_path / "ml"
    if setup == "missing":
        root.mkdir()
        (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    elif setup == "unknown_movie":
        write_latest(root)
        with open(root / "ratings.csv", "a") as f:
            f.write("1,999,4.0,400\n")
    elif setup == "bad_header":
        write_latest(root)
        (root / "movies.csv").write_text("id,name\n1,x\n")
    else:
        write_100k(root)
        (root / "u.item").write_text("1|Broken|0|1\n")
    with pytest.raises(ValueError, match=match):
        movielens.read_movielens(root)


def test_too_few_users_and_not_a_dir(tmp_path: Path) -> None:
    root = write_latest(tmp_path / "ml")
    with pytest.raises(ValueError, match="users"):
        RecsysTask.from_movielens(root, holdout=3)  # only user 1 has more than 3 ratings
    with pytest.raises(ValueError, match="not a directory"):
        RecsysTask.from_movielens(tmp_path / "nope")


# ------------------------------------------------------------------------------- duplicates and re-ratings


def _append_ratings(root: Path, rows: list[tuple[int, int, float, int]]) -> None:
    """Append rating rows in the folder's own layout."""
    if (root / "ratings.csv").exists():
        with open(root / "ratings.csv", "a") as f:
            f.writelines(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    else:
        with open(root / "u.data", "a") as f:
            f.writelines(f"{u}\t{m}\t{int(r)}\t{t}\n" for u, m, r, t in rows)


def test_duplicates_and_reratings_keep_the_latest_and_are_counted(ml_dir: Path) -> None:
    _append_ratings(
        ml_dir,
        [
            (1, 10, 4.0, 100),  # an exact copy of user 1's rating of movie 10
            (1, 10, 2.0, 400),  # user 1 re-rates movie 10 later: this one is kept
            (2, 20, 3.0, 20),  # same timestamp as user 2's 4-star row: the row read last wins
        ],
    )
    data = movielens.read_movielens(ml_dir)
    assert (data.num_rating_rows, data.num_duplicates, data.num_reratings) == (len(RATINGS) + 3, 1, 2)
    kept = {(r.user_id, r.movie_id): r for r in data.ratings}
    assert len(kept) == len(data.ratings) == len(RATINGS)
    assert (kept[1, 10].rating, kept[1, 10].timestamp) == (2.0, 400)
    assert kept[2, 20].rating == 3.0

    # Movie 10 is now user 1's latest rating: held out, and not also history (it was rated at t100 too).
    (s1,) = [s for s in movielens.split_by_time(data.ratings, holdout=1) if s.user_id == 1]
    assert [r.movie_id for r in s1.heldout] == [10] and [r.movie_id for r in s1.history] == [20, 30, 40]
    task = RecsysTask.from_movielens(ml_dir, holdout=1, history_len=2, num_candidates=2, eval_fraction=0.34)
    u1 = next(r for split in ("train", "eval") for r in task.build_dataset(split, 0) if r["user_id"] == 1)
    assert u1["history"] == ["i2", "i3"]  # the last two of movies 20, 30, 40; not movie 10 (i0)
    np.testing.assert_allclose(u1["relevance"], [0.4, 0.0, 0.0, 0.0])  # the 2-star re-rating counts


def test_dedupe_ratings_rule_and_split_refuses_repeats() -> None:
    r = movielens.Rating
    rows = [r(1, 5, 3.0, 10), r(1, 5, 3.0, 10), r(1, 5, 4.0, 10), r(1, 6, 1.0, 1), r(1, 5, 5.0, 2)]
    out = movielens.dedupe_ratings(rows)
    # The latest timestamp is 10 (three rows) and the last of them (4.0) wins; of the dropped rows one is a
    # copy of 3.0@10, and 3.0@10 and 5.0@2 are re-ratings.
    assert out.ratings == (r(1, 5, 4.0, 10), r(1, 6, 1.0, 1))
    assert (out.num_duplicates, out.num_reratings) == (1, 2)
    assert movielens.dedupe_ratings(rows[:2]).num_duplicates == 1
    with pytest.raises(ValueError, match=r"user 1 rated movie\(s\) \[5\] more than once"):
        movielens.split_by_time(rows, holdout=1)


# ----------------------------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    ("layout", "file", "edit", "match"),
    [
        ("latest", "ratings.csv", "1,10,abc,5\n", r"ratings\.csv line 12, field 'rating': expected a number"),
        ("latest", "ratings.csv", "1,10,4.0\n", r"ratings\.csv line 12: expected 4 fields, got 3"),
        ("latest", "ratings.csv", "1,10,9.0,5\n", r"ratings\.csv line 12, field 'rating': rating must lie"),
        (
            "latest",
            "ratings.csv",
            "1,999,4.0,5\n",
            r"ratings\.csv line 12, field 'movieId': movie id 999 is absent",
        ),
        (
            "latest",
            "ratings.csv",
            "x,10,4.0,5\n",
            r"ratings\.csv line 12, field 'userId': expected an integer",
        ),
        ("latest", "movies.csv", "six,Six (1995),Drama\n", r"movies\.csv line 7, field 'movieId'"),
        (
            "latest",
            "movies.csv",
            "10,Again (1995),Drama\n",
            r"movies\.csv line 7, field 'movieId'.*already defined on line 2",
        ),
        ("latest", "movies.csv", "60\n", r"movies\.csv line 7: expected 3 fields, got 1"),
        ("100k", "u.data", "1\t10\t4\n", r"u\.data line 11: expected 4 fields"),
        ("100k", "u.data", "1\t10\tfour\t5\n", r"u\.data line 11, field 'rating'"),
        ("100k", "u.data", "1\t10\t4\t5.5\n", r"u\.data line 11, field 'timestamp'"),
        ("100k", "u.item", "60|Broken|0|1\n", r"u\.item line 6: expected 24 '\|'-separated fields"),
        (
            "100k",
            "u.item",
            "60|T|d||u|" + "|".join("2" * 19) + "\n",
            r"u\.item line 6, field 'genre unknown'",
        ),
        ("100k", "u.genre", "Western\n", r"u\.genre line 20: expected 'name\|index'"),
    ],
)
def test_parse_errors_name_file_line_and_field(tmp_path: Path, layout: str, file: str, edit: str, match: str):
    root = write_latest(tmp_path / "ml") if layout == "latest" else write_100k(tmp_path / "ml")
    path = root / file
    text = path.read_bytes().decode("latin-1").rstrip("\n") + "\n"  # u.genre ends with a blank line
    path.write_bytes((text + edit).encode("latin-1"))
    with pytest.raises(movielens.MovieLensFormatError, match=match) as info:
        movielens.read_movielens(root)
    assert info.value.file == path and isinstance(info.value.line, int)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


# ----------------------------------------------------------------------------------------------- encodings


def test_latin1_movies_csv_is_detected(tmp_path: Path) -> None:
    root = write_latest(tmp_path / "ml")
    movies = root / "movies.csv"
    movies.write_bytes(movies.read_text(encoding="utf-8").encode("latin-1"))  # an old-style latin-1 file
    data = movielens.read_movielens(root)
    assert data.movies[40].title == "Café Society (1995)"
    assert data.encodings == {"movies.csv": "latin-1", "ratings.csv": "utf-8"}
    # Stated strictly, a wrong encoding is an error naming the file and the line of the first bad byte.
    with pytest.raises(movielens.MovieLensFormatError, match=r"movies\.csv line 5: .* is not valid utf-8"):
        movielens.read_movielens(root, encoding="utf-8")
    assert movielens.read_movielens(root, encoding="latin-1").movies[40].title == "Café Society (1995)"


def test_utf8_u_item_decodes_without_mojibake(tmp_path: Path) -> None:
    root = write_100k(tmp_path / "ml")
    item = root / "u.item"
    item.write_bytes(item.read_bytes().decode("latin-1").encode("utf-8"))  # re-encoded as UTF-8
    data = movielens.read_movielens(root)
    assert data.movies[40].title == "Café Society (1995)" and data.encodings["u.item"] == "utf-8"
    # The classic latin-1 file reads the same, and a stated encoding is obeyed as given.
    assert movielens.read_movielens(write_100k(tmp_path / "classic")).encodings["u.item"] == "latin-1"
    assert movielens.read_movielens(root, encoding="latin-1").movies[40].title == "CafÃ© Society (1995)"


def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    root = write_latest(tmp_path / "ml")
    ratings = root / "ratings.csv"
    ratings.write_bytes(b"\xef\xbb\xbf" + ratings.read_bytes())  # Excel-style UTF-8 with BOM
    data = movielens.read_movielens(root)
    assert len(data.ratings) == len(RATINGS) and data.encodings["ratings.csv"] == "utf-8"


# ------------------------------------------------------------------------------------ no silent truncation


def test_titles_with_separators_are_kept_whole(tmp_path: Path) -> None:
    root = write_100k(tmp_path / "ml100k")
    item = root / "u.item"
    text = item.read_bytes().decode("latin-1").replace("Heat (1995)", "Heat | Director's Cut (1995)")
    item.write_bytes(text.encode("latin-1"))
    assert movielens.read_movielens(root).movies[20].title == "Heat | Director's Cut (1995)"
    assert movielens.read_movielens(root).movies[20].genres == ("Action", "Crime")

    root = write_latest(tmp_path / "latest")
    movies = root / "movies.csv"
    unquoted = movies.read_text().replace(
        '"Sense and Sensibility, Part 1 (1995)"', "Sense, and Sensibility, 1"
    )
    movies.write_text(unquoted)
    data = movielens.read_movielens(root)
    assert data.movies[30].title == "Sense, and Sensibility, 1" and data.movies[30].genres == (
        "Drama",
        "Romance",
    )
