"""The result type of every executable claim in the verification report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClaimResult:
    """One checked claim.

    name       short identifier, e.g. ``"lemma1"``
    statement  the statement being checked (the paper's, or a consequence of it), in words
    computed   what was computed to check it, in words
    numbers    the measured numbers: a dict, or a list of row dicts (rendered as a table)
    passed     True when the check holds
    figures    paths of figures the section refers to
    notes      free text (e.g. what the paper states but does not prove)
    """

    name: str
    statement: str
    computed: str
    numbers: Any = field(default_factory=dict)
    passed: bool = False
    figures: list[str] = field(default_factory=list)
    notes: str = ""
