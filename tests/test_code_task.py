"""The ``code`` task on real HumanEval data: assertion units, candidate programs, canonical solutions passing,
Shapley credit of the coverage game, and the Task interface (dataset, demonstrations, vocabulary)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.games import SumOfMaxGame
from shapegrpo_core.shapley import shapley_exact, shapley_values
from shapegrpo_core.tasks.code import (
    CodeTask,
    candidate_program,
    humaneval_path,
    instrument_check,
    load_problems,
)
from shapegrpo_core.tasks.sandbox import CHECK_FUNCTION, SandboxLimits

LIMITS = SandboxLimits(timeout_s=20, call_timeout_s=5, load_timeout_s=10, startup_grace_s=10)
# Flat asserts, setup between them, a loop, filler that mentions no candidate, trailing statements.
VARIED = [
    "HumanEval/0",
    "HumanEval/32",
    "HumanEval/33",
    "HumanEval/38",
    "HumanEval/53",
    "HumanEval/151",
]


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return CodeTask(num_candidates=4, limits=LIMITS, max_workers=2)


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return {p["task_id"]: p for p in load_problems()}


def _candidates(*texts: str) -> list[Candidate]:
    return [Candidate(t, 0, len(t)) for t in texts]


def _example(problem: dict) -> dict:
    return {"code_prompt": problem["prompt"], "entry_point": problem["entry_point"], "test": problem["test"]}


# ---------------------------------------------------------------------------------------------- units


def _run_instrumented(test: str, candidate) -> list[tuple[int, str | None]]:
    inst = instrument_check(test)
    ns: dict = {}
    exec(inst.source, ns)
    out: list[tuple[int, str | None]] = []
    ns[CHECK_FUNCTION](candidate, lambda i, e: out.append((i, None if e is None else type(e).__name__)))
    return out


def test_units_group_setup_with_the_next_assert_and_skip_filler():
    test = """
METADATA = {}

def check(candidate):
    import math
    assert candidate(1) == 1
    x = candidate(2)
    assert True
    assert x == 4, "two"
    for i in range(3):
        assert candidate(i) == i * i
    assert True
    print("done")
"""
    inst = instrument_check(test)
    assert inst.num_units == 3
    assert inst.units[0] == "import math\nassert candidate(1) == 1"
    assert inst.units[1] == "x = candidate(2)\nassert True\nassert x == 4, 'two'"  # x comes from candidate
    assert inst.units[2].startswith("for i in range(3):")  # trailing filler and print are dropped
    assert _run_instrumented(test, lambda v: v * v) == [(0, None), (1, None), (2, None)]
    assert _run_instrumented(test, lambda v: v + v) == [
        (0, "AssertionError"),
        (1, None),
        (2, "AssertionError"),
    ]
    assert _run_instrumented(test, lambda v: 1 // 0) == [(i, "ZeroDivisionError") for i in range(3)]


def test_units_keep_function_scope_for_comprehensions():
    # HumanEval/38 style: a local import used inside a generator expression.
    test = "def check(candidate):\n    from random import choice\n"
    test += "    s = ''.join(choice('ab') for _ in range(5))\n    assert candidate(s) == s\n"
    assert _run_instrumented(test, lambda v: v) == [(0, None)]


def test_bad_tests_are_value_errors():
    with pytest.raises(ValueError, match="exactly one function"):
        instrument_check("def test(candidate):\n    assert candidate()\n")
    with pytest.raises(ValueError, match="one parameter"):
        instrument_check("def check(a, b):\n    assert a\n")
    with pytest.raises(ValueError, match="does not parse"):
        instrument_check("def check(candidate:\n")


def test_every_humaneval_test_has_units(problems):
    counts = [instrument_check(p["test"]).num_units for p in problems.values()]
    assert len(counts) == 164 and min(counts) >= 1


# -------------------------------------------------------------------------------------------- programs

PROMPT = 'def f(x: int) -> int:\n    """Square."""\n'


@pytest.mark.parametrize(
    "code",
    [
        "return x * x",
        "    return x * x",
        "y = x\nreturn y * x",
        "def f(x):\n    return x * x",
        "import math\n\ndef helper(v):\n    return v\n\n\ndef f(x: int) -> int:\n    return helper(x) * x",
        "    def f(x):\n        return x * x",
    ],
)
def test_candidate_program_bodies_and_definitions(code):
    program = candidate_program(PROMPT, "f", code)
    ns: dict = {}
    exec(program, ns)
    assert ns["f"](3) == 9


def test_blank_candidates_are_not_run():
    assert candidate_program(PROMPT, "f", "") is None
    assert candidate_program(PROMPT, "f", " \n\t\n") is None


# ------------------------------------------------------------------------------- real data, sandboxed


def test_canonical_solutions_pass_every_unit_fast(task, problems):
    """A handful of structurally different tests; each demonstration block (body, whole definition, commented
    copies) is a canonical solution and must pass everything."""
    items = []
    for tid in VARIED:
        p = problems[tid]
        cands = task.parse(task.demonstration_completion(p))
        assert len(cands) == task.num_candidates
        items.append((cands, _example(p)))
    for tid, hits in zip(VARIED, task.hit_matrices(items), strict=True):
        assert hits.all(), (tid, hits)
    assert task.stats["status_ok"] == len(VARIED) * task.num_candidates


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_every_unit(problems):
    task = CodeTask(num_candidates=1, limits=LIMITS, max_workers=2)
    items = [(_candidates(p["canonical_solution"]), _example(p)) for p in problems.values()]
    hits = task.hit_matrices(items)
    failing = [tid for tid, h in zip(problems, hits, strict=True) if not h.all()]
    print(f"canonical solutions passing every unit: {len(problems) - len(failing)}/{len(problems)}")
    assert failing == []


def test_shapley_credit_only_where_units_are_covered(task, problems):
    """{canonical, always-False, empty}: HumanEval/0 expects True in 4 units and False in 3. The canonical
    solution alone covers the 4 (4/7 credit) and shares the 3 with the broken one (3/14 each); the empty block
    is a null player. Credits sum to the set utility (efficiency) and match brute-force enumeration."""
    p = problems["HumanEval/0"]
    game = task.game(_candidates(p["canonical_solution"], "    return False", ""), _example(p))
    assert isinstance(game, SumOfMaxGame)
    assert game.num_targets == 7
    hits = game.scores.astype(bool)
    assert hits[:, 0].all() and hits[:, 1].sum() == 3 and not hits[:, 2].any()
    phi = shapley_values(game).values
    np.testing.assert_allclose(phi, [11 / 14, 3 / 14, 0.0], atol=1e-12)
    np.testing.assert_allclose(phi, shapley_exact(game), atol=1e-12)
    assert phi.sum() == pytest.approx(game.grand_value - game.u0)
    assert game.grand_value == pytest.approx(1.0) and game.u0 == 0.0


def test_hostile_and_malformed_candidates_score_zero(task, problems):
    p = problems["HumanEval/0"]
    data = str(humaneval_path())
    # Would pass the 4 units that expect True if it could read the data file; CodeTask hides it.
    cheat = f"import gzip\nassert gzip.open({data!r}).read(10)\nreturn True"
    bomb = "import os\nwhile True:\n    os.fork()"
    game = task.game(_candidates(cheat, bomb, "return (", "\x00\ufffd garbage"), _example(p))
    assert not game.scores.any()
    empty = task.game([], _example(p))
    assert empty.num_players == 0 and empty.grand_value == 0.0


def test_results_are_cached_and_deduplicated(problems):
    task = CodeTask(num_candidates=2, limits=LIMITS, max_workers=2)
    p = problems["HumanEval/53"]
    body = p["canonical_solution"]
    first = task.hit_matrices([(_candidates(body, body), _example(p))])[0]
    assert task.stats["status_ok"] == 1  # the duplicate ran once
    again = task.hit_matrices([(_candidates(body), _example(p))])[0]
    assert task.stats["status_ok"] == 1 and task.stats["cache_hit"] == 1
    assert first.all() and again.all()


# ------------------------------------------------------------------------------------- task interface


def test_dataset_splits_are_disjoint_deterministic_and_serialisable(task):
    train, evaluation = task.build_dataset("train", seed=0), task.build_dataset("eval", seed=0)
    assert len(train) + len(evaluation) == 164 and len(evaluation) == 33
    assert not set(train["task_id"]) & set(evaluation["task_id"])
    assert train["task_id"] == task.build_dataset("train", seed=0)["task_id"]
    assert train["task_id"] != task.build_dataset("train", seed=1)["task_id"]
    row = train[0]
    json.dumps(row)
    assert "4 different implementations" in row["prompt"] and row["code_prompt"] in row["prompt"]
    assert row["num_units"] == instrument_check(row["test"]).num_units
    with pytest.raises(ValueError, match="unknown split"):
        task.build_dataset("test", seed=0)


def test_demonstrations_are_format_valid(task):
    demos = task.demonstrations(10, seed=0)
    assert demos.column_names == ["prompt", "completion"] and len(demos) == 10
    assert all(task.format_valid(c) for c in demos["completion"])
    assert demos["prompt"] == task.demonstrations(10, seed=0)["prompt"]
    assert len(task.demonstrations(200, seed=0)) == 200  # more than the train split: sampled with repeats


def test_format_valid():
    task = CodeTask(num_candidates=2)
    assert task.format_valid("```python\nreturn 1\n```\n```python\nreturn 2\n```")
    assert not task.format_valid("```python\nreturn 1\n```\n```python\nreturn 1\n```")  # duplicates
    assert not task.format_valid("```python\nreturn 1\n```\n```python\nreturn 2")  # unclosed fence
    assert not task.format_valid("return 1")


def test_vocabulary_words(task):
    words = task.vocabulary()
    assert len(words) > 1000 and words == sorted(set(words))
    assert "```python" in words and "return" in words
    # What the offline word-level tokenizer requires (policy.word_pieces; checked for real in the slow test).
    assert all(w and not any(ch.isspace() for ch in w) and "▁" not in w for w in words)


@pytest.mark.slow
def test_vocabulary_fits_the_offline_tokenizer(task):
    from shapegrpo_core.policy import word_pieces

    word_pieces(task.vocabulary())  # raises on a word the tokenizer cannot hold


def test_constructor_validation(tmp_path):
    with pytest.raises(ValueError):
        CodeTask(num_candidates=0)
    bad = tmp_path / "problems.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match="lacks fields"):
        CodeTask(problems_path=bad).build_dataset("train", seed=0)
