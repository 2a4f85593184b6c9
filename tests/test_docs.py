"""The project's docs are true: every ```python snippet in README.md and docs/*.md runs as written (in a fresh
namespace, from a temporary directory), and the project explains itself without internal notes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            out.append((doc.relative_to(ROOT).as_posix(), text[: m.start()].count("\n") + 1, m.group(1)))
    return out


@pytest.mark.parametrize(("doc", "line", "code"), snippets(), ids=[f"{d}:{n}" for d, n, _ in snippets()])
def test_snippet_runs(
    doc: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__doc_snippet__"})


def test_there_are_snippets() -> None:
    assert len(snippets()) >= 3


def test_no_file_refers_to_internal_notes() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pattern = re.compile(r"\.\./shared|DESIGN\.md|DESIGN §")
    hits = [
        f
        for f in files.split()
        if f.endswith((".py", ".md", ".yaml", ".toml", ".sh"))
        and f != "tests/test_docs.py"
        and os.path.exists(ROOT / f)
        and pattern.search((ROOT / f).read_text(encoding="utf-8", errors="replace"))
    ]
    assert hits == []
