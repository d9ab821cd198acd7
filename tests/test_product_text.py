"""What the product says speaks to its users only.

Code, help texts, docs and generated reports must not refer to the project's tracker, to files
that are not shipped, to people or to the machines it was developed on. This scans every text
file of the shipped packages, the docs and the README (help texts and report texts are strings
in those sources), and the ``--help`` of every command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".json", ".csv"}

FORBIDDEN = {
    "a tracker reference": re.compile(r"\bissues? ?#?\d+|\bticket ?#?\d+", re.IGNORECASE),
    "an unshipped reference file": re.compile(r"\b(anchors|style|DEVELOPERS)\.md\b"),
    "a developer machine path": re.compile(r"(?<![\w.])/(work|root|home|Users|tmp)/"),
    "development history or people": re.compile(
        r"\bcolleague|\b(this|next|previous|working) session\b|\bthe lead\b|\bhelper agent",
        re.IGNORECASE,
    ),
    "a reference to the development process": re.compile(
        r"\bthe issue\b|\bissue's|\bwas fixed\b|\b(which|that) used to\b"
        r"|\bearlier (session|commit)s?\b|\bprevious (commit|implementation)s?\b",
        re.IGNORECASE,
    ),
}


def _files() -> list[Path]:
    out = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for top in ("flownp", "verification", "docs"):
        out += [
            p
            for p in sorted((ROOT / top).rglob("*"))
            if p.is_file() and p.suffix in SCANNED_SUFFIXES and "__pycache__" not in p.parts
        ]
    return out


def _hits(text: str) -> list[str]:
    found = []
    for what, pattern in FORBIDDEN.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {what}: {m.group(0)!r}")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = "see issue 12 and anchors.md, run from /work/main, as a colleague said"
    assert len(_hits(bad)) == 4
    assert not _hits("runs/<timestamp>/checkpoint.h5; tissue 3; mktemp -d; docs/style of x")
    history = "as the issue says; the issue's order; a bug that was fixed; which used to fail"
    assert len(_hits(history)) == 4
    assert not _hits("the report of an earlier run; the previous file; used to colour a figure")


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_references(path: Path):
    hits = _hits(path.read_text(encoding="utf-8"))
    assert not hits, f"{path.relative_to(ROOT)}: " + "; ".join(hits)


def test_help_texts(capsys):
    from flownp import cli

    names = ["--help"] + [f"{name} --help" for name in cli.COMMANDS]
    for args in names:
        with pytest.raises(SystemExit):
            cli.main(args.split())
        text = capsys.readouterr().out
        assert text.strip(), args
        assert not _hits(text), f"flownp {args}: {_hits(text)}"
