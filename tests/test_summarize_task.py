"""The ``summarize`` task: fixture data, ROUGE-recall facility-location games whose Shapley credit matches
brute-force enumeration, demonstrations, vocabulary and bad input."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.shapley import shapley_exact, shapley_values
from shapegrpo_core.tasks.summarize import FIXTURE, SummarizeTask, load_documents, split_sentences


@pytest.fixture(scope="module")
def task() -> SummarizeTask:
    return SummarizeTask(num_candidates=3)


def _candidates(*texts: str) -> list[Candidate]:
    return [Candidate(t, 0, len(t)) for t in texts]


def brute_force_shapley(game, num_players: int) -> np.ndarray:
    """phi_i = average over all K! orders of i's marginal contribution (the definition, no shortcuts)."""
    phi = np.zeros(num_players)
    orders = list(itertools.permutations(range(num_players)))
    for order in orders:
        coalition = np.zeros(num_players, dtype=bool)
        before = float(game.value(coalition))
        for i in order:
            coalition[i] = True
            after = float(game.value(coalition))
            phi[i] += after - before
            before = after
    return phi / math.factorial(num_players)


def test_fixture_loads_and_splits(task):
    docs = load_documents(FIXTURE)
    assert len(docs) == 16 and all(len(d["reference_sentences"]) >= 2 for d in docs)
    train, evaluation = task.build_dataset("train", seed=0), task.build_dataset("eval", seed=0)
    assert (len(train), len(evaluation)) == (12, 4)
    assert not set(train["id"]) & set(evaluation["id"])
    assert train["id"] == task.build_dataset("train", seed=0)["id"]
    assert sorted(train["id"]) == sorted(task.build_dataset("train", seed=1)["id"])
    row = train[0]
    json.dumps(row)
    assert row["prompt"].startswith("Summarize the document in 3 different") and "\n" not in row["prompt"]


def test_game_credits_match_brute_force_on_every_fixture_document(task):
    rng = np.random.default_rng(0)
    for example in (
        task.build_dataset("train", seed=0).to_list() + task.build_dataset("eval", seed=0).to_list()
    ):
        sentences = split_sentences(example["document"])
        # A lead sentence, a reference sentence (full recall of it), a random document sentence, a duplicate.
        cands = [sentences[0], example["reference_sentences"][-1], str(rng.choice(sentences)), sentences[0]]
        game = task.game(_candidates(*cands), example)
        phi = shapley_values(game).values  # closed form
        brute = brute_force_shapley(game, len(cands))
        np.testing.assert_allclose(phi, brute, atol=1e-12)
        np.testing.assert_allclose(shapley_exact(game), brute, atol=1e-12)
        assert phi.sum() == pytest.approx(game.grand_value - game.u0)  # efficiency
        assert phi[0] == pytest.approx(phi[3])  # symmetry: duplicates split their credit
        # Candidate 1 is the last reference sentence (recall 1): the gap to the runner-up there is its own.
        w, last = game.weights[-1], game.scores[-1]
        assert last[1] == 1.0 and phi[1] >= w * (1.0 - max(last[0], last[2])) - 1e-12


def test_scores_are_rouge_recall_of_each_reference_sentence(task):
    example = task.build_dataset("train", seed=0)[0]
    summaries = ["the council voted", example["reference_sentences"][0]]
    game = task.game(_candidates(*summaries), example)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = [
        [scorer.score(r, s)["rouge1"].recall for s in summaries] for r in example["reference_sentences"]
    ]
    np.testing.assert_allclose(game.scores, expected)
    assert game.scores[0, 1] == 1.0
    np.testing.assert_allclose(game.weights, 1.0 / len(example["reference_sentences"]))


def test_rouge_l_and_degenerate_sets():
    task = SummarizeTask(num_candidates=2, rouge_type="rougeL")
    example = task.build_dataset("eval", seed=0)[0]
    empty = task.game([], example)
    assert empty.num_players == 0 and empty.grand_value == 0.0
    junk = task.game(_candidates("zzz qqq", "\u2603 \x00"), example)
    assert junk.grand_value == 0.0 and not shapley_values(junk).values.any()  # null players


def test_demonstrations_are_format_valid_and_extractive(task):
    demos = task.demonstrations(20, seed=0)
    assert demos.column_names == ["prompt", "completion"] and len(demos) == 20
    for prompt, completion in zip(demos["prompt"], demos["completion"], strict=True):
        assert task.format_valid(completion), completion
        cands = task.parse(completion)
        assert [completion[c.start : c.end] for c in cands] == [c.text for c in cands]
        assert all(c.text in prompt for c in cands)  # lead sentences of the document
    assert demos["completion"] == task.demonstrations(20, seed=0)["completion"]


def test_parse_numbered_lists(task):
    assert [c.text for c in task.parse(" 1. a b. 2. c d. 3. e.")] == ["a b.", "c d.", "e."]
    assert [c.text for c in task.parse("1. first\n2. second\n3. third")] == ["first", "second", "third"]
    assert not task.format_valid("1. same 2. same 3. same")
    assert task.parse("no list here") == []


def test_vocabulary_covers_prompts_and_demonstrations(task):
    words = set(task.vocabulary())
    assert {"1.", "2.", "3.", "Summarize", "Summaries:"} <= words
    for row in task.demonstrations(16, seed=0):
        assert set((row["prompt"] + row["completion"]).split()) <= words
    assert all(w and not any(ch.isspace() for ch in w) for w in words)


def test_user_files_and_bad_input(tmp_path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    row = {"id": 7, "document": "One. Two. Three. Four.", "reference": ["One and two."]}
    train.write_text(
        json.dumps(row) + "\n\n" + json.dumps({**row, "id": 8, "reference": "Three. Four."}) + "\n"
    )
    evaluation.write_text(json.dumps({**row, "id": 9}) + "\n")
    task = SummarizeTask(num_candidates=2, data_path=train, eval_path=evaluation)
    assert sorted(task.build_dataset("train", seed=0)["id"]) == ["7", "8"]
    assert task.documents("train")[1]["reference_sentences"] == ["Three.", "Four."]
    assert task.build_dataset("eval", seed=0)["id"] == ["9"]
    for bad in ["{not json", json.dumps({"id": 1, "document": "x"}), json.dumps({**row, "reference": []})]:
        path = tmp_path / "bad.jsonl"
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
            load_documents(path)
    with pytest.raises(ValueError, match="rouge_type"):
        SummarizeTask(rouge_type="bleu")
    with pytest.raises(ValueError, match="unknown split"):
        SummarizeTask().build_dataset("test", seed=0)
