"""One exception type for conversion problems, with every offending name listed.

Users hit these on multi-GB checkpoints: the message must say *which* tensors or fields are
wrong (all of them, not the first), so one run is enough to see what to fix.
"""
from typing import Iterable, List, Sequence, Tuple

LIST_LIMIT = 40  # names shown per section; the rest are counted


class ConversionError(Exception):
    """A checkpoint or config does not fit the model; the message names every problem."""


def section(title: str, lines: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return f"{title} ({len(lines)}):\n" + "\n".join(shown)


def raise_if_problems(headline: str, sections: Iterable[Tuple[str, List[str]]]) -> None:
    """Raises ConversionError with every non-empty section; returns when all are empty."""
    parts = [section(title, lines) for title, lines in sections if lines]
    if parts:
        raise ConversionError(headline + "\n" + "\n".join(parts))
