"""How many property-based cases each fuzz test ran (printed in the terminal summary)."""

from __future__ import annotations

FUZZ_CASES: dict[str, int] = {}


def count(name: str) -> None:
    FUZZ_CASES[name] = FUZZ_CASES.get(name, 0) + 1
