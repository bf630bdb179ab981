"""Terminal output of the `tritonep` command: aligned tables and progress.

Progress bars come from tqdm or rich when one is installed (the `tools` extra) and fall back to
one plain line per finished step otherwise, so a bare install still shows that work is moving and
a log file stays readable. Progress goes to stderr: stdout carries only results, which a user may
pipe or diff.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Sequence


def has_module(name: str) -> bool:
    """True when `import name` would find the module (without importing it)."""
    return importlib.util.find_spec(name) is not None


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Rows under headers, one column per field: text left-aligned, numbers right-aligned.

    Floats print with one decimal; None prints as "-".
    """
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule] + [line(row) for row in cells])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


class Progress:
    """Steps of a long job: `advance(label)` after each step, `close()` at the end (or `with`)."""

    def __init__(self, total: int, title: str, enabled: bool = True):
        self.total, self.title, self.done = total, title, 0
        self._started = time.monotonic()
        self._update: Callable[[str], None] | None = None
        self._close: Callable[[], None] | None = None
        if not enabled:
            return
        if has_module("tqdm"):
            from tqdm import tqdm

            bar = tqdm(total=total, desc=title, unit="step", file=sys.stderr, leave=False)

            def update(label: str) -> None:
                bar.set_postfix_str(label, refresh=False)
                bar.update(1)

            self._update, self._close = update, bar.close
        elif has_module("rich"):
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            rich = RichProgress(transient=True, console=Console(file=sys.stderr))
            task = rich.add_task(title, total=total)
            rich.start()
            self._update = lambda label: rich.update(
                task, advance=1, description=f"{title}: {label}"
            )
            self._close = rich.stop
        else:
            print(f"{title}: {total} step{'s' * (total != 1)}", file=sys.stderr, flush=True)
            self._update = self._print_step

    def _print_step(self, label: str) -> None:
        elapsed = time.monotonic() - self._started
        print(
            f"  [{self.done}/{self.total}] {label} ({elapsed:.0f} s)", file=sys.stderr, flush=True
        )

    def advance(self, label: str) -> None:
        self.done += 1
        if self._update is not None:
            self._update(label)

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self._update = self._close = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
