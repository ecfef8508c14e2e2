"""Cooperative cancellation: long loops ask :func:`checkpoint` whether the job they serve was stopped.

Gradio's Stop (or a client's cancel) only frees the queue slot: a merge, importance run, probe or
training already running in a worker thread went on to the end, using the CPU of a 2-core Space for
nobody. A front end runs each job under :func:`cancellable` with a :class:`CancelToken` and sets the
token when the request is cancelled; the merge tensor loop, the importance partition and expert loops,
probe batches and training steps call :func:`checkpoint`, which raises :class:`Cancelled` once the
token is set. Outside a cancellable job, :func:`checkpoint` costs one attribute lookup and does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .errors import MergeLabError

_LOCAL = threading.local()


class Cancelled(MergeLabError):
    """The job was stopped by its user; nothing it was building is kept."""

    def __init__(self, message: str = "stopped: the job was cancelled before it finished (nothing was kept)"):
        super().__init__(message, field=None)


class CancelToken:
    """Set once, from any thread, to stop the job running under it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def cancellable(token: CancelToken) -> Iterator[CancelToken]:
    """Run the body (in this thread) under ``token``: its :func:`checkpoint` calls raise once it is set."""
    previous = getattr(_LOCAL, "token", None)
    _LOCAL.token = token
    try:
        yield token
    finally:
        _LOCAL.token = previous


def current_token() -> CancelToken | None:
    return getattr(_LOCAL, "token", None)


def checkpoint() -> None:
    """Raise :class:`Cancelled` when the job this thread runs was cancelled."""
    token = getattr(_LOCAL, "token", None)
    if token is not None and token.cancelled:
        raise Cancelled()
