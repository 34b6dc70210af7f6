"""One shape-letter legend: every `Legend` in src/ gives the core letters their one meaning.

Core: T tokens, D model dim, F expert hidden dim, E experts, K experts (slots) per token, N
assignments, H heads, L layers. Analysis (and offload's simulation, which shares its letters) adds
S sequences, G domains, R bootstrap replicates, C cache capacity. A file may add letters of its own
(W ranks, I/O GEMM widths, ...) but not give one of these another meaning.
"""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moekit"

# letter -> words one of which its meaning must contain
CORE = {"T": ("token",), "D": ("model dim",), "F": ("hidden",), "E": ("expert",), "K": ("expert", "pick"),
        "N": ("assignment", "request", "rows"), "H": ("head",), "L": ("layer", "stream")}
ANALYSIS = {"S": ("sequence",), "G": ("domain",), "R": ("replicate",), "C": ("capacity", "depth")}
ANALYSIS_FILES = ("analysis/", "offload/simulate.py")
# Collisions in files other work is rewriting, each to be fixed there (the lead empties this list).
KNOWN = {
    ("routers/recurrent.py", "H"): "H = the GRU's hidden size (gru_dim): another letter, with the router rewrite",
}

ENTRY = re.compile(r"(?:^|[,;]|\s{2,}|\.\s)\s*([A-Z])\s{1,2}(?:=\s*)?([A-Za-z][^,;]*?)"
                   r"(?=\s*(?:[,;]|$|\.\s)|\s{2,}[A-Z]\s{1,2}[A-Za-z])")


def legend(text: str) -> list[tuple[str, str]]:
    """(letter, meaning) of each entry of the `Legend...:` paragraphs of a file (parentheses dropped)."""
    out = []
    for m in re.finditer(r"Legend[^:\n]*:(.*?)(?:\n\s*\n|\"\"\")", text, re.S):
        for line in re.sub(r"\([^()]*\)", "", m.group(1)).split("\n"):
            out += [(e.group(1), e.group(2).strip()) for e in ENTRY.finditer(line.rstrip(". "))]
    return out


def collisions(rel: str, text: str) -> list[str]:
    rules = {**CORE, **(ANALYSIS if rel.startswith(ANALYSIS_FILES) else {})}
    return [f"{rel}: {letter} = {meaning!r} (the legend's {letter}: {' / '.join(rules[letter])})"
            for letter, meaning in legend(text)
            if letter in rules and not any(w in meaning.lower() for w in rules[letter])
            and (rel, letter) not in KNOWN]


def test_every_legend_keeps_the_shared_letters():
    found = [c for p in sorted(SRC.rglob("*.py")) for c in collisions(p.relative_to(SRC).as_posix(), p.read_text())]
    assert not found, "shape letters with another meaning:\n" + "\n".join(found)


def test_every_known_collision_is_still_there():
    def wrong(rel: str, letter: str) -> bool:
        return any(lt == letter and not any(w in m.lower() for w in CORE[letter])
                   for lt, m in legend((SRC / rel).read_text()))

    fixed = [k for k in KNOWN if not wrong(*k)]
    assert not fixed, f"fixed: remove these from KNOWN {fixed}"


def test_the_parser_reads_both_legend_styles():
    one_line = '"""x.\n\nLegend: T tokens, D model dim (width), E experts, F expert hidden dim.\n"""'
    assert legend(one_line) == [("T", "tokens"), ("D", "model dim"), ("E", "experts"), ("F", "expert hidden dim")]
    columns = '"""x.\n\nLegend of shape suffixes:\n  L  MoE layers             T  tokens of one sequence\n' \
              '  S  sequences              D  domains\n\nrest\n"""'
    assert legend(columns) == [("L", "MoE layers"), ("T", "tokens of one sequence"), ("S", "sequences"),
                               ("D", "domains")]
    assert collisions("analysis/x.py", columns) == ["analysis/x.py: D = 'domains' (the legend's D: model dim)"]
