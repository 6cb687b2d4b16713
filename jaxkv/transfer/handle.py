"""`Transfer`: a handle to pages in flight between device and host."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


class Transfer:
    """An asynchronous page transfer.

    JAX dispatches the copy and returns at once; the handle lets a scheduler
    overlap it with compute. `is_complete()` polls and never blocks;
    `synchronize()` waits and then runs the transfer's completion step (for a
    device-to-host copy: placing the rows in the host pool) exactly once.
    """

    def __init__(
        self,
        direction: str,
        num_pages: int,
        nbytes: int,
        arrays: Sequence[jax.Array] = (),
        on_complete: Callable[[], None] | None = None,
    ):
        self.direction = direction
        """'d2h' or 'h2d'."""
        self.num_pages = num_pages
        self.nbytes = nbytes
        """Page bytes moved (a replicated page counted once per device written)."""
        self._arrays = list(arrays)
        self._on_complete = on_complete

    @property
    def arrays(self) -> list:
        """The arrays whose readiness means the transfer is done (empty once it completed)."""
        return self._arrays

    def is_complete(self) -> bool:
        """Whether every copy has finished. Never blocks."""
        # is_ready is on every concrete array, but jax.Array's type stub does not declare it.
        return all(a.is_deleted() or a.is_ready() for a in self._arrays)  # pyright: ignore[reportAttributeAccessIssue]

    def synchronize(self) -> Transfer:
        """Block until the copy has finished and its bytes are in place."""
        for a in self._arrays:
            if not a.is_deleted():
                a.block_until_ready()
        if self._on_complete is not None:
            done, self._on_complete = self._on_complete, None
            done()
        self._arrays = []
        return self

    def __repr__(self) -> str:
        state = "complete" if self.is_complete() else "in flight"
        return f"Transfer({self.direction}, {self.num_pages} pages, {self.nbytes} B, {state})"


def completed(direction: str, num_pages: int, nbytes: int) -> Transfer:
    """A transfer that finished synchronously."""
    return Transfer(direction, num_pages, nbytes)


def combine(direction: str, parts: list[Transfer]) -> Transfer:
    """One handle for several transfers: complete when all are."""
    if len(parts) == 1:
        return parts[0]
    arrays = [a for t in parts for a in t.arrays]

    def done():
        for t in parts:
            t.synchronize()

    return Transfer(direction, sum(t.num_pages for t in parts), sum(t.nbytes for t in parts), arrays, done)
