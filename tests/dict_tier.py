"""`DictTier`: a whole `jaxkv.Tier` in a page of test code, shared by the tier and manager tests."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from jaxkv import RowLayout


class DictTier:
    """A tier in a Python dict: LRU within `capacity_bytes`, rows copied in and out. All of `jaxkv.Tier`."""

    def __init__(self, capacity_bytes: int, *, name: str = "dict"):
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.evictions = 0
        self.corrupt = 0  # nothing here is ever unverifiable
        self.row_bytes = 0
        self.rows: OrderedDict[bytes, bytes] = OrderedDict()  # oldest first
        self._evicted: list[bytes] = []
        self.received: list[bytes] = []
        """Every hash put_many newly stored, in order."""
        self.closed = False

    @property
    def used_bytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def open(self, layout: RowLayout) -> None:
        self.row_bytes = layout.row_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.rows

    def touch(self, block_hashes) -> None:
        for block_hash in block_hashes:
            if block_hash in self.rows:
                self.rows.move_to_end(block_hash)

    def put_many(self, items):
        answers = []
        for block_hash, row in items:
            if block_hash in self.rows:
                self.rows.move_to_end(block_hash)
                answers.append(False)
            elif self.row_bytes > self.capacity_bytes:
                answers.append(MemoryError(f"a row ({self.row_bytes} B) exceeds {self.capacity_bytes} B"))
            else:
                while self.used_bytes + self.row_bytes > self.capacity_bytes:
                    self._evicted.append(self.rows.popitem(last=False)[0])
                    self.evictions += 1
                self.rows[block_hash] = row.tobytes()  # a copy: the host slot is reused
                self.received.append(block_hash)
                answers.append(True)
        return answers

    def take_evicted(self) -> list[bytes]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def get_many(self, items):
        answers = []
        for block_hash, out in items:
            if block_hash not in self.rows:
                answers.append(KeyError(block_hash.hex()[:16]))
                continue
            out[:] = np.frombuffer(self.rows[block_hash], np.uint8)
            self.rows.move_to_end(block_hash)
            answers.append(None)
        return answers

    def close(self) -> None:
        self.closed = True
