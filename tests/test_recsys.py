"""The recsys task: a seeded world, hand-checked relevance and games, malformed completions, datasets."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shapegrpo_core.games import SumOfMaxGame
from shapegrpo_core.tasks import get_task
from shapegrpo_core.tasks.recsys import (
    GAMES,
    Catalogue,
    RecsysTask,
    UserRecord,
    affinity,
    format_completion_text,
    reference_levels,
    relevance,
)

SMALL = dict(num_items=24, num_genres=4, num_train_users=30, num_eval_users=10)


def _value(task: RecsysTask, completion: str, example: dict) -> float:
    cands = task.parse(completion)[: task.num_candidates]
    game = task.game(cands, example)
    return float(game.value(np.ones((1, game.num_players), dtype=bool))[0])


# ---------------------------------------------------------------------------------- a world by hand

# genres action(0), comedy(1), drama(2); items: 0 action .9, 1 action .5, 2 comedy .8, 3 comedy .2,
# 4 drama 1.0, 5 drama .4, 6 action|comedy .6
HAND_CATALOGUE = Catalogue(
    genres=("action", "comedy", "drama"),
    item_genres=((0,), (0,), (1,), (1,), (2,), (2,), (0, 1)),
    quality=(0.9, 0.5, 0.8, 0.2, 1.0, 0.4, 0.6),
)


def _hand_user() -> UserRecord:
    # interests action (strength 1.0), comedy (0.5): weights 2/3, 1/3; affinity action 1, comedy .5, drama 0
    aff = affinity(3, [0, 1], [1.0, 0.5], background=0.0)
    rel = relevance(HAND_CATALOGUE, aff, history=[1])
    return UserRecord(
        user_id=7,
        history=(1,),
        interests=(0, 1),
        interest_weights=(2 / 3, 1 / 3),
        relevance=tuple(rel.tolist()),
    )


def _hand_task(game: str) -> RecsysTask:
    user = _hand_user()
    return RecsysTask.from_world(
        HAND_CATALOGUE,
        {"train": [user], "eval": [user]},
        num_candidates=3,
        game=game,
        coverage_threshold=0.25,
    )


def test_affinity_and_relevance_by_hand() -> None:
    aff = affinity(3, [0, 1], [1.0, 0.5], background=0.0)
    np.testing.assert_allclose(aff, [1.0, 0.5, 0.0])
    np.testing.assert_allclose(affinity(3, [2], [0.4], background=0.1), [0.1, 0.1, 1.0])
    # rel = quality * max affinity over the item's genres; the history item (1) is 0.
    np.testing.assert_allclose(_hand_user().relevance, [0.9, 0.0, 0.4, 0.1, 0.0, 0.0, 0.6])


def test_best_of_set_by_hand() -> None:
    task = _hand_task("best_of_set")
    ex = task.build_dataset("train", 0)[0]
    assert ex["prompt"] == "history: i1 -> recommend 3:"
    assert _value(task, " i0, i2, i4", ex) == pytest.approx(0.9)
    assert _value(task, " i3, i2", ex) == pytest.approx(0.4)
    assert _value(task, " i1, i4, i5", ex) == 0.0  # history item and zero-affinity genre
    game = task.game(task.parse(" i0, i2, i4"), ex)
    assert isinstance(game, SumOfMaxGame) and game.num_players == 3 and game.u0 == 0.0
    np.testing.assert_allclose(game.scores, [[0.9, 0.4, 0.0]])


def test_coverage_by_hand() -> None:
    task = _hand_task("coverage")
    ex = task.build_dataset("train", 0)[0]
    assert _value(task, " i0, i2, i4", ex) == pytest.approx(1.0)  # action by i0 (.9), comedy by i2 (.4)
    assert _value(task, " i0, i4", ex) == pytest.approx(2 / 3)
    assert _value(task, " i3, i5", ex) == 0.0  # i3 is comedy but rel .1 < .25
    assert _value(task, " i6", ex) == pytest.approx(1.0)  # one action|comedy item with rel .6 covers both
    assert _value(task, " i1", ex) == 0.0  # the history item covers nothing
    game = task.game(task.parse(" i0, i2, i4"), ex)
    np.testing.assert_array_equal(game.scores, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(game.weights, [2 / 3, 1 / 3])


def test_soft_coverage_by_hand() -> None:
    task = _hand_task("soft_coverage")
    ex = task.build_dataset("train", 0)[0]
    assert _value(task, " i0, i2", ex) == pytest.approx(2 / 3 * 0.9 + 1 / 3 * 0.4)
    assert _value(task, " i3", ex) == pytest.approx(1 / 3 * 0.1)
    assert _value(task, " i6, i2", ex) == pytest.approx(2 / 3 * 0.6 + 1 / 3 * 0.6)


# ---------------------------------------------------------------------------------- the synthetic world


def test_world_is_deterministic_per_seed() -> None:
    a, b, c = RecsysTask(seed=3, **SMALL), RecsysTask(seed=3, **SMALL), RecsysTask(seed=4, **SMALL)
    assert a.catalogue == b.catalogue and a.users == b.users
    assert a.catalogue != c.catalogue
    for split in ("train", "eval"):
        assert a.build_dataset(split, 0).to_list() == b.build_dataset(split, 0).to_list()
    assert a.demonstrations(20, 1).to_list() == b.demonstrations(20, 1).to_list()
    assert a.demonstrations(20, 1).to_list() != a.demonstrations(20, 2).to_list()


def test_dataset_seed_only_orders_rows() -> None:
    task = RecsysTask(**SMALL)
    d0, d1 = task.build_dataset("train", 0), task.build_dataset("train", 1)
    assert d0.to_list() != d1.to_list()
    key = lambda rows: sorted(rows, key=lambda r: r["user_id"])  # noqa: E731
    assert key(d0.to_list()) == key(d1.to_list())
    # Eval users are distinct from train users and resizing one split leaves the other unchanged.
    assert not {r["user_id"] for r in d0} & {r["user_id"] for r in task.build_dataset("eval", 0)}
    bigger = RecsysTask(**{**SMALL, "num_eval_users": 20})
    assert bigger.users["train"] == task.users["train"]


def test_default_world_shape_and_learnability() -> None:
    task = RecsysTask()
    assert task.num_candidates == 4 and task.catalogue.num_items == 60 and len(task.catalogue.genres) == 8
    train, ev = task.build_dataset("train", 0), task.build_dataset("eval", 0)
    assert len(train) == 400 and len(ev) == 100
    genres_of = lambda tok: {task.catalogue.genres[g] for g in task.catalogue.item_genres[int(tok[1:])]}  # noqa: E731
    for row in train:
        assert len(row["history"]) == 5 and len(set(row["history"])) == 5
        assert row["prompt"] == f"history: {' '.join(row['history'])} -> recommend 4:"
        # The history reveals the interests: every history item is of an interest genre ...
        assert all(genres_of(tok) & set(row["interests"]) for tok in row["history"])
        # ... and every relevant item is of a genre the history shows (with background affinity 0).
        rel = np.asarray(row["relevance"])
        assert rel.min() >= 0 and rel.max() <= 1
        shown = set().union(*(genres_of(t) for t in row["history"]))
        assert all(genres_of(f"i{j}") & shown for j in np.flatnonzero(rel > 0))
        assert all(rel[int(t[1:])] == 0 for t in row["history"])
        assert sum(row["interest_weights"]) == pytest.approx(1.0)


def test_rows_are_json_serialisable_and_saved(tmp_path) -> None:
    task = RecsysTask(**SMALL)
    row = task.build_dataset("train", 0)[0]
    assert json.loads(json.dumps(row)) == row
    paths = task.save(tmp_path / "recsys", seed=0)
    for split in ("train", "eval"):
        back = datasets.Dataset.from_parquet(str(paths[split]))
        assert back.to_list() == task.build_dataset(split, 0).to_list()
    meta = json.loads(paths["catalogue"].read_text())
    assert meta["catalogue"]["genres"] == list(task.catalogue.genres)
    assert len(meta["catalogue"]["item_genres"]) == task.catalogue.num_items


def test_demonstrations_are_format_valid_distinct_and_outside_history() -> None:
    task = RecsysTask(**SMALL)
    demos = task.demonstrations(200, seed=0)
    assert demos.column_names == ["prompt", "completion"] and len(demos) == 200
    history_of = {r["prompt"]: set(r["history"]) for r in task.build_dataset("train", 0)}
    for row in demos:
        assert task.format_valid(row["completion"])
        items = [c.text for c in task.parse(row["completion"])]
        assert len(set(items)) == task.num_candidates
        assert not set(items) & history_of[row["prompt"]]
        assert row["completion"] == format_completion_text(items)


def test_vocabulary_and_registry() -> None:
    task = get_task("recsys", **SMALL)
    assert isinstance(task, RecsysTask) and task.name == "recsys"
    vocab = task.vocabulary()
    assert len(vocab) == len(set(vocab))
    assert {f"i{j}" for j in range(24)} | set(task.catalogue.genres) <= set(vocab)
    assert {"history", "->", "recommend", "4", ",", ":"} <= set(vocab)
    # Every word of every prompt and demo completion is in the vocabulary (punctuation split off).
    words = set(vocab)
    texts = list(task.build_dataset("train", 0)["prompt"]) + list(task.demonstrations(20, 0)["completion"])
    for text in texts:
        assert set(text.replace(",", " , ").replace(":", " : ").split()) <= words


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"game": "nope"}, "unknown recsys game"),
        ({"num_candidates": 0}, "num_candidates"),
        ({"history_len": 0}, "history_len"),
        ({"num_items": 10, "num_genres": 12}, "num_genres"),
        ({"num_items": 8, "num_genres": 8, "history_len": 5}, "history_len"),
        ({"num_interests": 9}, "num_interests"),
        ({"background_affinity": 2.0}, "background_affinity"),
    ],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecsysTask(**{**SMALL, **kwargs})


def test_bad_split_and_mismatched_row_raise() -> None:
    task = RecsysTask(**SMALL)
    with pytest.raises(ValueError, match="split"):
        task.build_dataset("test", 0)
    row = dict(task.build_dataset("train", 0)[0])
    row["relevance"] = row["relevance"][:5]
    with pytest.raises(ValueError, match="relevance"):
        task.game(task.parse(" i1, i2"), row)


# ---------------------------------------------------------------------------------- malformed completions


@pytest.mark.parametrize("game", GAMES)
@pytest.mark.parametrize(
    ("completion", "num_players", "valid"),
    [
        (" i0, i2, i4", 3, True),
        ("i0,i2,i4", 3, True),
        ("", 0, False),
        ("   ", 0, False),
        (",,, ;", 0, False),
        ("garbage tokens here", 1, False),
        ("i0 i2 i4", 1, False),  # no delimiters: one candidate that names no item
        (" i0, i0, i2", 3, False),  # duplicate
        (" i0, i2, i4, i5, i6", 5, False),  # too many: callers score the first K
        (" i0, i99, item2", 3, False),  # non-items
        (" I0, i2 , i4.", 3, False),
        ("ï0, 🎬, \x00", 3, False),
        (" i0\n i2; i4", 3, True),  # newlines and ";" also delimit
    ],
)
def test_malformed_completions(game: str, completion: str, num_players: int, valid: bool) -> None:
    task = _hand_task(game)
    ex = task.build_dataset("train", 0)[0]
    cands = task.parse(completion)
    assert len(cands) == num_players
    assert task.format_valid(completion) is valid
    g = task.game(cands[: task.num_candidates], ex)
    assert g.num_players == min(num_players, task.num_candidates)
    value = float(g.value(np.ones((1, g.num_players), dtype=bool))[0])
    assert np.isfinite(value) and value >= 0.0


def test_malformed_values_by_hand() -> None:
    task = _hand_task("best_of_set")
    ex = task.build_dataset("train", 0)[0]
    assert _value(task, "", ex) == 0.0
    assert _value(task, "garbage", ex) == 0.0
    assert _value(task, " i0, i0, i3", ex) == pytest.approx(0.9)  # duplicates: still the best item
    assert _value(task, " i3, i2, i4, i0", ex) == pytest.approx(0.4)  # i0 is 4th of K=3: not scored
    assert _value(task, " i99, item0, I0, i0.", ex) == 0.0
    assert task.utility(" i2, x", ex) == pytest.approx(0.4)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("i0123456789 ,;:\n-x🎬")), max_size=40))
def test_any_text_gives_a_finite_game(completion: str) -> None:
    for game in GAMES:
        task = _HYPO_TASKS[game]
        cands = task.parse(completion)
        assert all(completion[c.start : c.end] == c.text for c in cands)
        g = task.game(cands[: task.num_candidates], _HYPO_EXAMPLE)
        values = g.value(np.ones((1, g.num_players), dtype=bool))
        assert np.isfinite(values).all()


_HYPO_TASKS = {game: _hand_task(game) for game in GAMES}
_HYPO_EXAMPLE = _HYPO_TASKS["best_of_set"].build_dataset("train", 0)[0]


# ------------------------------------------------------------------------------ presets and references


def test_presets_build_the_named_worlds_and_overrides_win() -> None:
    task = get_task("recsys", preset="interests", game="coverage")
    assert isinstance(task, RecsysTask)
    assert (task.catalogue.num_items, len(task.catalogue.genres), task.num_candidates) == (24, 4, 4)
    assert task.game_name == "coverage" and task.coverage_threshold == 0.5
    assert RecsysTask.from_preset("interests_k8").num_candidates == 8
    assert RecsysTask.from_preset("interests", num_candidates=2).num_candidates == 2
    legacy = RecsysTask.from_preset("legacy")
    assert legacy.catalogue.num_items == RecsysTask().catalogue.num_items
    with pytest.raises(ValueError, match="unknown recsys preset 'nope'"):
        RecsysTask.from_preset("nope")
    with pytest.raises(ValueError, match="has no presets"):
        get_task("code", preset="interests")


@pytest.mark.parametrize("game", GAMES)
def test_item_gains_value_every_set_as_the_game_does(game: str) -> None:
    task = RecsysTask.from_preset("interests", game=game, **{"num_train_users": 5, "num_eval_users": 5})
    rng = np.random.default_rng(0)
    for row in task.build_dataset("eval", 0):
        weights, gains = task.item_gains(row)  # (T,), (T, I)
        for _ in range(5):
            items = rng.choice(task.catalogue.num_items, size=4, replace=False)
            completion = format_completion_text([f"i{j}" for j in items])
            expected = float(weights @ gains[:, items].max(axis=1))
            assert _value(task, completion, row) == pytest.approx(expected)


def test_reference_levels_by_hand() -> None:
    """Two users, K = 1: user 7 (hand user) is best served by i0 (0.9), user 8 (drama only, history i5) by
    i4 (1.0). Oracle: (0.9 + 1.0) / 2. One item for both: i4 gives (0 + 1.0) / 2 = 0.5 > i0's 0.45."""
    drama = UserRecord(
        user_id=8,
        history=(5,),
        interests=(2,),
        interest_weights=(1.0,),
        relevance=tuple(relevance(HAND_CATALOGUE, affinity(3, [2], [1.0], 0.0), [5]).tolist()),
    )
    users = {"train": [_hand_user()], "eval": [_hand_user(), drama]}
    task = RecsysTask.from_world(HAND_CATALOGUE, users, num_candidates=1, game="best_of_set")
    levels = reference_levels(task, task.build_dataset("eval", 0), random_draws=4000)
    assert levels["oracle"] == pytest.approx(0.95)
    assert levels["prompt_independent"] == pytest.approx(0.5)
    # a uniform random item: user 7's relevances sum to 2.0, user 8's to 1.0, over 7 items
    assert levels["random"] == pytest.approx((2.0 / 7 + 1.0 / 7) / 2, abs=0.01)
    # K = 3 covers both users' best items with one set: prompt-independent reaches the oracle
    task3 = RecsysTask.from_world(HAND_CATALOGUE, users, num_candidates=3, game="best_of_set")
    levels3 = reference_levels(task3, task3.build_dataset("eval", 0))
    assert levels3["prompt_independent"] == pytest.approx(levels3["oracle"]) == pytest.approx(0.95)


def test_the_interests_preset_needs_the_prompt() -> None:
    """What the preset is for: at K = 4 the best set that ignores the prompt is far below the per-user
    oracle, and a random set far below that (numbers in docs/tasks.md, "Presets")."""
    for game in ("best_of_set", "coverage"):
        task = RecsysTask.from_preset("interests", game=game)
        levels = reference_levels(task, task.build_dataset("eval", 0))
        assert levels["random"] + 0.2 < levels["prompt_independent"] < levels["oracle"] - 0.05
