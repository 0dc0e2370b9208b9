"""Run-config values both sides read (the server body, the client builder, the CLI), parsed in one place."""

from __future__ import annotations


def parse_ranks(text: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (run config ``client-ranks``); a clear error for anything but positive integers."""
    try:
        ranks = [int(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"client-ranks {text!r} must be comma-separated integers, e.g. '2,4,8'") from None
    if any(r < 1 for r in ranks):
        raise ValueError(f"client-ranks {text!r}: every rank must be >= 1")
    return ranks
