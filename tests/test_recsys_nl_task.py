"""The natural-language ``recsys_nl`` task: readable titles, prompts that show titles, robust title matching,
hallucinated and history items worth 0 and counted, malformed answers as recorded zeros, MovieLens titles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shapegrpo_core import shapley_values
from shapegrpo_core.evaluation import score_responses
from shapegrpo_core.tasks import get_task
from shapegrpo_core.tasks.recsys_nl import NLRecsysTask, TitleIndex, normalize_title, title_year


@pytest.fixture(scope="module")
def task() -> NLRecsysTask:
    return NLRecsysTask(
        num_items=24, num_genres=4, num_train_users=20, num_eval_users=6, background_affinity=0.3, seed=0
    )


def test_synthetic_titles_are_readable_distinct_and_hint_at_the_genre(task: NLRecsysTask) -> None:
    titles = task.titles
    assert len(titles) == task.catalogue.num_items
    assert len({normalize_title(t) for t in titles}) == len(titles)  # distinct even after normalising
    assert all(t.replace("-", " ").replace(" ", "").isalpha() for t in titles)
    from shapegrpo_core.tasks.recsys_nl import GENRE_NOUNS

    for title, genres in zip(titles, task.catalogue.item_genres, strict=True):
        genre = task.catalogue.genres[genres[0]]
        assert any(title.endswith(noun) for noun in GENRE_NOUNS[genre])
    assert NLRecsysTask(num_items=24, num_genres=4, seed=0).titles == titles  # seeded
    assert get_task("recsys_nl", num_items=24, num_genres=4).titles == titles


def test_prompt_shows_history_and_pool_as_titles(task: NLRecsysTask) -> None:
    row = task.build_dataset("train", seed=0)[0]
    assert all(t in row["prompt"] for t in row["history_titles"] + row["pool_titles"])
    assert "i1" not in row["prompt"].split()  # no item ids
    assert len(row["pool_titles"]) == 16 and not set(row["pool_titles"]) & set(row["history_titles"])
    assert row["history_titles"] == [task.titles[task._item_index[t]] for t in row["history"]]
    assert task.build_dataset("train", seed=0)[0] == row


@pytest.mark.parametrize(
    ("written", "title"),
    [
        ("the last starship", "The Last Starship"),  # case
        ("  The   Last Starship  ", "The Last Starship"),  # whitespace
        ("The Last Starship!", "The Last Starship"),  # punctuation
        ('"The Last Starship."', "The Last Starship"),  # quotes
        ("**The Last Starship**", "The Last Starship"),  # markdown
        ("The Last Starship (2019)", "The Last Starship"),  # a trailing year
        ("The Last Starship 2019", "The Last Starship"),
        ("Last Starship", "The Last Starship"),  # a leading article dropped
        ("The Last Starship - a space opera about loss", "The Last Starship"),  # a description after it
        ("Lion King, The (1994)", "The Lion King (1994)"),  # MovieLens's article suffix
        ("The Lion King", "Lion King, The (1994)"),
        ("Beauty & the Beast", "Beauty and the Beast (1991)"),
        ("Ｔｈｅ Ｌａｓｔ Ｓｔａｒｓｈｉｐ", "The Last Starship"),  # full-width unicode (NFKC)
        ("Café Society", "Cafe\u0301 Society (2016)"),  # composed vs decomposed accent
    ],
)
def test_title_matching_is_robust(written: str, title: str) -> None:
    index = TitleIndex(["Another Film", title])
    assert index.lookup(written) == 1


def test_title_matching_tells_remakes_apart_by_year_and_rejects_other_titles() -> None:
    index = TitleIndex(["Hamlet (1990)", "Hamlet (1996)", "Star Wars: Episode IV - A New Hope (1977)"])
    assert index.lookup("Hamlet (1996)") == 1 and index.lookup("Hamlet 1990") == 0
    assert index.lookup("Hamlet") == 0  # no year: the first in catalogue order
    assert index.lookup("Star Wars: Episode IV - A New Hope") == 2
    for other in ("Hamlet 2", "Omelet", "", "   ", "1995", "😀", "Star Wars"):
        assert index.lookup(other) is None, other
    assert title_year("Heat (1995)") == 1995 and title_year("Heat") is None


def _completion(titles: list[str]) -> str:
    return "\n".join(f"{i}. {t}" for i, t in enumerate(titles, 1))


def test_hallucinated_history_and_duplicate_items_are_worth_zero_and_counted(task: NLRecsysTask) -> None:
    row = task.build_dataset("train", seed=0)[0]
    rel = np.asarray(row["relevance"])
    pool = sorted(row["pool_titles"], key=lambda t: -rel[task.item_of(t)])
    best, second = pool[0], pool[1]
    text = _completion([best.upper(), "The Matrix Reloaded", row["history_titles"][0], f"{second} (2001)"])
    task.stats.clear()
    [score] = score_responses(task, [text], [row], task.num_candidates, scorer_errors="raise")
    assert [c.text for c in score.candidates][1] == "The Matrix Reloaded"
    assert dict(task.stats) == {
        "candidates": 4,
        "matched": 2,
        "hallucinated": 1,
        "history": 1,
        "duplicate": 0,
    }
    phi = shapley_values(score.game).values
    assert phi[1] == 0 and phi[2] == 0  # null players
    np.testing.assert_allclose(
        score.singleton_utilities, [rel[task.item_of(best)], 0, 0, rel[task.item_of(second)]]
    )
    assert score.set_utility == pytest.approx(rel[task.item_of(best)])
    assert score.format_valid is False  # "The Matrix Reloaded" is not in the catalogue

    dup = _completion([best, best.lower(), second, pool[2]])
    task.stats.clear()
    [score] = score_responses(task, [dup], [row], task.num_candidates, scorer_errors="raise")
    assert task.stats["duplicate"] == 1 and not task.format_valid(dup)
    phi = shapley_values(score.game).values
    assert phi[0] == pytest.approx(phi[1]) and phi[0] > 0  # a duplicate splits its credit
    assert task.format_valid(_completion(pool[:4]))


@pytest.mark.parametrize(
    ("text", "num_parsed"),
    [
        ("", 0),  # empty
        ("I cannot recommend movies.", 1),  # no list: one hallucinated candidate
        ("😀🎉 ✓ 中文", 1),  # unicode noise
        ("1. 😀\n2. 🎉\n3. 中文", 3),
        ("1.\n2.\n3.", 3),  # markers without titles: three lines that name nothing
    ],
)
def test_malformed_answers_are_recorded_zeros(task: NLRecsysTask, text: str, num_parsed: int) -> None:
    row = task.build_dataset("eval", seed=0)[0]
    [score] = score_responses(task, [text], [row], task.num_candidates, scorer_errors="raise")
    assert score.num_parsed == num_parsed and score.set_utility == 0.0 and not score.format_valid


def test_too_many_titles_only_the_first_k_play(task: NLRecsysTask) -> None:
    row = task.build_dataset("eval", seed=0)[0]
    six = _completion(row["pool_titles"][:6])
    [score] = score_responses(task, [six], [row], task.num_candidates, scorer_errors="raise")
    assert score.num_parsed == 6 and score.num_scored == 4 and not task.format_valid(six)
    one_line = ", ".join(row["pool_titles"][:4])  # comma-separated on one line also parses
    assert [c.text for c in task.parse(one_line)] == row["pool_titles"][:4]


def test_movielens_titles_when_files_are_supplied(tmp_path: Path) -> None:
    movies = [
        (1, "Toy Story (1995)", "Animation|Comedy"),
        (2, '"Lion King, The (1994)"', "Animation|Drama"),
        (3, "Heat (1995)", "Action|Crime"),
        (4, "Aladdin (1992)", "Animation|Comedy"),
        (5, "Casino (1995)", "Crime|Drama"),
        (6, "Jumanji (1995)", "Adventure|Comedy"),
    ]
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(f"{m},{t},{g}\n" for m, t, g in movies), encoding="utf-8"
    )
    ratings = [(u, m, 3.0 + (u + m) % 3, 10 * m + u) for u in (1, 2, 3) for m in range(1, 7) if (u + m) % 4]
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in ratings),
        encoding="utf-8",
    )
    task = NLRecsysTask(
        movielens_path=tmp_path, num_candidates=2, history_len=2, holdout=1, pool_size=3, eval_fraction=0.34
    )
    assert task.titles[1] == "Lion King, The (1994)"
    row = task.build_dataset("train", seed=0)[0]
    assert all(t in row["prompt"] for t in row["history_titles"]) and len(row["pool_titles"]) == 3
    assert task.item_of("The Lion King") == 1 and task.item_of("toy story") == 0
    held_out = [j for j, r in enumerate(row["relevance"]) if r > 0]
    assert held_out and set(held_out) <= {task.item_of(t) for t in row["pool_titles"]}  # positives offered
    text = _completion([task.titles[held_out[0]].split(" (")[0], "Titanic"])
    [score] = score_responses(task, [text], [row], 2, scorer_errors="raise")
    assert score.set_utility == pytest.approx(row["relevance"][held_out[0]]) and score.set_utility > 0
