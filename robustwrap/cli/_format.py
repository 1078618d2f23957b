"""Plain-text output shared by the commands: aligned columns, values, accuracies, one-line errors."""

from __future__ import annotations

from collections.abc import Sequence


def _columns(rows: Sequence[Sequence[str]], align_left: bool = False) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    just = str.ljust if align_left else str.rjust
    lines = ["  ".join(just(cell, w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _value(value) -> str:
    return "-" if value is None else str(value)


def _accuracy(value) -> str:
    if isinstance(value, float) and 0 <= value <= 1:
        return f"{100 * value:.1f}%"
    return _value(value)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) would wrap the message in quotes
    if not isinstance(error, (ValueError, TypeError, OSError, KeyError, ImportError, FloatingPointError)):
        text = f"{type(error).__name__}: {text}"
    return text
