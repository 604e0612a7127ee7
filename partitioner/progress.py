"""Progress lines: the `Progress` callables the phases take, and the sink the solvers report
to while they run, which a caller sets around a block of code.

The ``partitioner`` command shows these lines on stderr. A library caller that sets no
sink sees nothing of the progress; a note (a line worth keeping, such as the fallback to
CBC) then becomes a warning, so that it is never silent.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Progress", "reporting", "listening", "say", "note"]

Progress = Callable[[str], None]
"""Takes a status line (``"tracing GPT2LMHeadModel"``)."""


@dataclass(frozen=True, slots=True)
class _Sink:
    progress: Progress
    """Takes a status line that replaces the previous one."""
    note: Progress
    """Takes a line to keep."""


_SINK: ContextVar[_Sink | None] = ContextVar("partitioner_solve_sink", default=None)


@contextmanager
def reporting(progress: Progress, note: Progress | None = None) -> Iterator[None]:
    """Within the block (in this thread or task), solvers report to these callables.

    Args:
        progress: Called with a status line, each replacing the last (e.g. a spinner's text),
            from the thread that called the solver.
        note: Called with a line to keep (default: ``progress``).
    """
    token = _SINK.set(_Sink(progress, note or progress))
    try:
        yield
    finally:
        _SINK.reset(token)


def listening() -> bool:
    """Whether a sink is set in this thread or task."""
    return _SINK.get() is not None


def say(line: str) -> None:
    """Report a status line, if anyone listens."""
    sink = _SINK.get()
    if sink is not None:
        sink.progress(line)


def note(line: str) -> None:
    """Report a line worth keeping: to the sink, else as a warning."""
    sink = _SINK.get()
    if sink is not None:
        sink.note(line)
    else:
        warnings.warn(line, RuntimeWarning, stacklevel=3)
