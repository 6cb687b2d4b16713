"""`BlockPool`: device pages, reference counts, and the prefix cache over them.

Every page is in exactly one of two states:

- **in use**: ref count > 0, held by one or more live requests (shared
  prefixes share pages);
- **free**: ref count 0, in the free queue, oldest-freed first. A free page
  may still hold a committed block (its hash is in the index): it serves
  prefix hits until it is reused, and reusing it evicts that block.

Page 0 is the null page: never allocated, used to pad page tables.
All operations are O(1): the free queue is an ordered dict.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Container

from jaxkv._checks import check_int

NULL_PAGE = 0


class InsufficientPagesError(Exception):
    """A request needs more free pages than the pool has."""


class BlockPool:
    """Fixed device pages with reference counts, an LRU free queue and a hash index."""

    def __init__(self, num_pages: int):
        num_pages = check_int("num_pages", num_pages, minimum=2, expected="an int >= 2 (page 0 is the null page)")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        self.page_hash: list[bytes | None] = [None] * num_pages
        self.hash_to_page: dict[bytes, int] = {}
        # Free pages, least recently freed first. Page 0 (null) never enters it.
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self.evictions = 0
        """Committed blocks dropped because their free page was reused."""

    @property
    def num_free(self) -> int:
        """Pages in the free queue (some may still hold committed blocks)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages held by live requests (the null page excluded)."""
        return self.num_pages - 1 - len(self._free)

    def lookup(self, block_hash: bytes) -> int | None:
        """The page holding `block_hash`, or None."""
        return self.hash_to_page.get(block_hash)

    def next_free(self, n: int, skip: Container[int] = ()) -> list[int]:
        """The `n` pages `allocate` would hand out next, once the pages in `skip` left the free queue.

        Nothing changes: a caller plans on these pages before taking them.
        """
        return list(itertools.islice((p for p in self._free if p not in skip), n))

    def allocate(self) -> int:
        """Take the least recently freed page (evicting the block it held)."""
        if not self._free:
            raise InsufficientPagesError("no free page")
        page, _ = self._free.popitem(last=False)
        old = self.page_hash[page]
        if old is not None:
            del self.hash_to_page[old]
            self.page_hash[page] = None
            self.evictions += 1
        self.ref_counts[page] = 1
        return page

    def acquire(self, page: int) -> None:
        """Take a reference to a page found by `lookup` (a prefix hit)."""
        if self.ref_counts[page] == 0:
            del self._free[page]
        self.ref_counts[page] += 1

    def release(self, page: int) -> None:
        """Drop a reference; at zero the page joins the free queue, keeping its block."""
        if self.ref_counts[page] <= 0:
            raise ValueError(f"page {page} is not in use (ref count {self.ref_counts[page]})")
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            self._free[page] = None

    def commit(self, page: int, block_hash: bytes) -> bool:
        """Index `page` as holding `block_hash`. False if another page already holds it."""
        if block_hash in self.hash_to_page:
            return self.hash_to_page[block_hash] == page
        if self.page_hash[page] is not None:
            raise ValueError(f"page {page} already holds a committed block")
        self.page_hash[page] = block_hash
        self.hash_to_page[block_hash] = page
        return True

    def uncommit(self, page: int) -> None:
        """Forget the block a page holds (its bytes are no longer trustworthy)."""
        old = self.page_hash[page]
        if old is not None:
            del self.hash_to_page[old]
            self.page_hash[page] = None

    def reset_cache(self) -> None:
        """Forget every committed block (pages and ref counts stay as they are)."""
        for page in self.hash_to_page.values():
            self.page_hash[page] = None
        self.hash_to_page.clear()
