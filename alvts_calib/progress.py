"""Progress bars for long steps (rich), silent when disabled, and named phases that a listener can time."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

PhaseListener = Callable[[str, bool], None]  # (phase name, True on entering / False on leaving)
_listeners: list[PhaseListener] = []


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over `items`, drawing a progress bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    with _progress() as progress:
        yield from progress.track(items, total=total, description=description)


@contextmanager
def counting(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar of `total` steps advanced by hand: yields a function that advances it by one."""
    if not enabled:
        yield lambda: None
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def note(message: str, enabled: bool = True) -> None:
    """One line about the run on stderr, when `enabled` (as progress bars are)."""
    if enabled:
        print(message, file=sys.stderr)


def _progress() -> Progress:
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    )
    return Progress(*columns, transient=False, console=Console(stderr=True))


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a named phase of a long step (calibration's capture, solve, ...) for the listeners, if any; phases may
    nest."""
    for listener in _listeners:
        listener(name, True)
    try:
        yield
    finally:
        for listener in _listeners:
            listener(name, False)


@contextmanager
def listening(listener: PhaseListener) -> Iterator[None]:
    """Call `listener(name, entering)` on entering and leaving every `phase` inside the block (for benchmarks)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
