"""The ``aclsum`` task: the package's splits, the aspect facility-location game against brute-force Shapley,
pluggable scorers, and malformed answers as recorded zeros."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from shapegrpo_core import shapley_values
from shapegrpo_core.candidates import Candidate
from shapegrpo_core.evaluation import score_responses
from shapegrpo_core.tasks import get_task
from shapegrpo_core.tasks.aclsum import ASPECTS, ACLSumTask, detokenize, load_split


@pytest.fixture(scope="module")
def task() -> ACLSumTask:
    return ACLSumTask(num_candidates=3, max_source_words=60)


def test_every_split_of_the_package_loads(task: ACLSumTask) -> None:
    sizes = {split: len(task.build_dataset(split, seed=0)) for split in ("train", "val", "test", "eval")}
    assert sizes == {"train": 100, "val": 50, "test": 100, "eval": 50}  # eval is the package's val split
    ids = {split: set(task.build_dataset(split, seed=0)["id"]) for split in ("train", "val", "test")}
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    for row in task.build_dataset("test", seed=0):
        assert len(row["references"]) == len(ASPECTS) and all(r.strip() for r in row["references"])
        assert row["title"] in row["prompt"] and row["source"] in row["prompt"]
    with pytest.raises(ValueError, match="unknown split"):
        task.build_dataset("dev", seed=0)


def test_source_text_respects_the_word_budget_and_sections() -> None:
    doc = load_split("val")[0]
    short = ACLSumTask(max_source_words=40).source_text(doc)
    first = detokenize(doc.sentences["abstract"][0])
    assert short.startswith(first)
    assert len(short.split()) <= max(40, len(first.split()))  # at least one sentence, else within budget
    more = ACLSumTask(sections=("abstract", "introduction"), max_source_words=10_000).source_text(doc)
    assert detokenize(doc.sentences["introduction"][-1]) in more and len(more) > len(short)
    assert detokenize("extraction , and ( QA ) .") == "extraction, and (QA)."
    with pytest.raises(ValueError, match="sections"):
        ACLSumTask(sections=("appendix",))


def test_same_seed_same_rows_and_the_registry_builds_it(task: ACLSumTask) -> None:
    assert task.build_dataset("train", 3)["id"] == task.build_dataset("train", 3)["id"]
    assert task.build_dataset("train", 3)["id"] != task.build_dataset("train", 4)["id"]
    assert isinstance(get_task("aclsum", num_candidates=2), ACLSumTask)


def _brute_force_shapley(value, k: int) -> np.ndarray:
    """phi_i = sum over coalitions S not holding i of |S|!(k-|S|-1)!/k! (U(S+i) - U(S))."""
    phi = np.zeros(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for size in range(k):
            for s in itertools.combinations(others, size):
                w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
                phi[i] += w * (value(set(s) | {i}) - value(set(s)))
    return phi


def test_game_equals_brute_force_shapley_on_sampled_papers(task: ACLSumTask) -> None:
    """Candidates: sentences of the paper, a reference itself, a duplicate and an unrelated sentence."""
    rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    rows = task.build_dataset("train", seed=0)
    rng = np.random.default_rng(0)
    for idx in rng.choice(len(rows), size=4, replace=False):
        row = rows[int(idx)]
        sentences = [s for s in row["source"].split(". ") if s.strip()]
        texts = [
            sentences[0],
            row["references"][1],
            sentences[0],
            "Bananas are yellow.",
            sentences[-1],
        ]
        cands = [Candidate(t, 0, len(t)) for t in texts]
        game = task.game(cands, row)
        # U(S) computed independently, straight from rouge-score: each aspect by its best candidate.
        f1 = [[rouge.score(ref, t)["rouge1"].fmeasure for t in texts] for ref in row["references"]]

        def value(s: set[int], f1: list[list[float]] = f1) -> float:
            return sum(max((f1[a][j] for j in s), default=0.0) for a in range(len(ASPECTS))) / len(ASPECTS)

        res = shapley_values(game)
        assert res.engine == "closed_form"
        np.testing.assert_allclose(res.values, _brute_force_shapley(value, len(texts)), atol=1e-9)
        assert res.values[0] == pytest.approx(res.values[2])  # the duplicate splits its credit
        assert res.values[1] == max(res.values)  # the reference of an aspect earns the most
        np.testing.assert_allclose(res.values.sum(), value(set(range(len(texts)))), atol=1e-12)


def test_malformed_answers_are_recorded_zeros_never_errors(task: ACLSumTask) -> None:
    row = task.build_dataset("val", seed=0)[0]
    good = "1. We study parsing.\n2. We build a corpus.\n3. Parsers do poorly."
    texts = [
        "",  # empty
        "This paper is about parsing and it is good.",  # no list
        "😀🎉 ✓✓ ∑ 中文",  # unicode noise, no list
        "1. 😀🎉\n2. ✓✓\n3. 中文",  # a list of unicode noise
        good + "\n4. Extra one.\n5. And another.",  # too many
        good,
    ]
    scores = score_responses(task, texts, [row] * len(texts), task.num_candidates, scorer_errors="raise")
    assert [s.num_parsed for s in scores] == [0, 0, 0, 3, 5, 3]
    assert [s.set_utility for s in scores[:4]] == [0.0, 0.0, 0.0, 0.0]
    assert [s.format_valid for s in scores] == [False, False, False, True, False, True]
    # Too many: only the first K are players (extras are worth nothing), the response is format-invalid.
    assert scores[4].num_scored == 3 and scores[4].set_utility == pytest.approx(scores[5].set_utility)
    assert scores[5].set_utility > 0
    assert task.parse("- first point\n- second point") and len(task.parse("- a\n- b")) == 2  # bullets too


def _word_overlap(references, candidates):  # a scorer named by "module:function"
    return np.array(
        [
            [len(set(r.split()) & set(c.split())) / max(1, len(set(r.split()))) for c in candidates]
            for r in references
        ]
    )


def test_scorer_is_pluggable_and_a_broken_scorer_is_a_clear_error() -> None:
    row = ACLSumTask().build_dataset("val", seed=0)[0]
    cand = [Candidate(row["references"][0], 0, len(row["references"][0]))]
    named = ACLSumTask(scorer=f"{__name__}:_word_overlap")
    assert float(named.game(cand, row).value(np.ones((1, 1), bool))[0]) == pytest.approx(
        float(_word_overlap(row["references"], [cand[0].text]).max(axis=1).mean())
    )
    rouge2 = ACLSumTask(scorer="rouge2")
    assert shapley_values(rouge2.game(cand, row)).values[0] > 0
    broken = ACLSumTask(scorer=lambda refs, cands: np.full((len(refs), len(cands)), np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        broken.game(cand, row)
    wrong = ACLSumTask(scorer=lambda refs, cands: np.zeros((1, 1)))
    with pytest.raises(ValueError, match="shape"):
        wrong.game(cand, row)
    # Through the trainer's scorer a broken scorer is a recorded NaN set, not a crash.
    assert score_responses(broken, ["1. x"], [row], 3, scorer_errors="nan") == [None]
    with pytest.raises(ValueError, match="unknown scorer"):
        ACLSumTask(scorer="bleu")
