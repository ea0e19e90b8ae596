"""Readable sizes and durations for plan summaries and error messages."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (e.g. ``"15.4 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"  # unreachable; keeps type checkers content


def format_seconds(t: float) -> str:
    """``t`` seconds in s, ms, us or ns (e.g. ``"85.6 ms"``)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"
