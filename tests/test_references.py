"""Docstrings, comments and docs cite only what is in the repository or public: no path of a build
machine, and none of the design notes kept outside the repository (cite the paper's arXiv id, the
reference repository and file, or a page under docs/ instead)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ["src", "docs", "tests", "benchmarks", "scripts"]
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|mnt|scratch|Users)/[\w.-]+")
# Design notes that live outside the repository. offload.md shares its name with docs/offload.md, so
# only a bare mention counts: not docs/offload.md, not a link between docs/ pages, not a file name in code.
OUTSIDE = re.compile(r"\b(?:algorithms|architecture|target-layout|conventions)\.md\b|\bdesign/\w[\w-]*\.md\b"
                     r"|(?<![\w/(\"'-])offload\.md\b")


def _files():
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix in (".py", ".md", ".toml", ".cfg", ".sh") and path.is_file():
                yield path
    for name in ("README.md", "DATA.md", "pyproject.toml"):
        if (REPO / name).is_file():
            yield REPO / name


def _problems(text: str) -> list[str]:
    return [f"a path of a build machine: {m.group(0)}" for m in MACHINE_PATH.finditer(text)] + \
           [f"{m.group(0)} is a design note outside the repository" for m in OUTSIDE.finditer(text)]


def test_no_build_machine_paths_and_no_design_notes_from_outside_the_repo():
    found = [f"{path.relative_to(REPO)}:{i}: {problem}"
             for path in _files() if path != Path(__file__).resolve()
             for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             for problem in _problems(line)]
    assert not found, "cite the repository or a public source:\n" + "\n".join(found)


def test_the_scan_finds_what_it_must():
    bad = "See /work/shared/design/offload.md, algorithms.md §0 and, as said in offload.md, x."
    assert len(_problems(bad)) == 4  # the path, design/offload.md, algorithms.md, the bare offload.md
    fine = 'docs/offload.md; [offload](offload.md); DOCS / "offload.md"; moekit writes compare.md; arXiv 2412.14711'
    assert _problems(fine) == []
