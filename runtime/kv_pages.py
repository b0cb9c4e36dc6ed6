"""Host-side page allocator for the paged KV cache, with automatic prefix caching.

The KV cache is ``num_pages`` fixed-size pages of ``page_size`` tokens. Page 0 is reserved: padded
token rows of a step write their K/V there, so it is never handed out. Every other page is in
exactly one of three states:

- free: reference count 0 and no content hash; kept in a FIFO free list.
- used: reference count > 0 (owned by one or more running requests; sharing a prefix raises it).
- cached: reference count 0 but its content hash is known; kept in an LRU so a later request with
  the same prefix can reuse it. A cached page is evicted (hash dropped) when the free list is empty.

Invariants (tested with hypothesis): no page is in two states; free + used + cached == total,
where total = num_pages - 1 (page 0 excluded).

A full page is identified by a chained hash of (parent page hash, its token ids), so equal hashes
mean equal whole prefixes. Partial pages are never cached.

This module must never import jax (a test asserts it).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

from xlaserve.runtime.config import pages_needed

PageHash = bytes
_ROOT_HASH = b"xlaserve-root"


def hash_page(parent: PageHash | None, token_ids: Sequence[int]) -> PageHash:
    """Chained content hash of one full page: depends on every token of the prefix before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else _ROOT_HASH)
    h.update(b",".join(str(int(t)).encode() for t in token_ids))
    return h.digest()


class PageAllocator:
    """Free list, reference counts and the prefix cache of full pages.

    Args:
      num_pages: pages in the KV cache including the reserved page 0 (P).
      page_size: tokens per page (L).
      enable_prefix_caching: when False, released pages go straight back to the free list.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r}: must be >= 2 (page 0 is reserved)")
        if not isinstance(page_size, int) or page_size < 2:
            raise ValueError(f"page_size={page_size!r}: must be >= 2")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._hash: list[PageHash | None] = [None] * num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        # Cached pages with ref 0, least recently released first (evicted first).
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._by_hash: dict[PageHash, int] = {}

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        """Pages that can be handed out (page 0 excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Reusable pages with ref 0 that still hold a cached prefix."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Pages `allocate` can hand out now (free ones, then evicted cached ones)."""
        return len(self._free) + len(self._lru)

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    # ---- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """Hands out `n` pages with ref 1, or None (nothing changed) if fewer are available."""
        if n < 0:
            raise ValueError(f"n={n}: must be >= 0")
        if n > self.num_available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently released cached page
                page, _ = self._lru.popitem(last=False)
                h = self._hash[page]
                if h is not None and self._by_hash.get(h) == page:
                    del self._by_hash[h]
                self._hash[page] = None
            self._ref[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page. Pages reaching ref 0 become cached (if hashed) or free.

        Pages are released from the last to the first, so a sequence's tail pages are evicted before
        its head pages (a cached chain is useless without its head).
        """
        for page in reversed(pages):
            if page <= 0 or page >= self.num_pages or self._ref[page] <= 0:
                raise ValueError(f"page={page}: not an allocated page (double release?)")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if self._hash[page] is not None:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    # ---- prefix cache -------------------------------------------------------------------------
    def find_prefix(self, token_ids: Sequence[int], max_tokens: int) -> tuple[list[int],
                                                                              list[PageHash]]:
        """Longest run of cached full pages that match the start of `token_ids`.

        Only pages entirely within the first `max_tokens` tokens count (the caller keeps at least
        one token to compute, so that the step has logits to sample from). Does not take references:
        call `acquire` on the pages to keep them.

        Returns:
          (page ids, their chained hashes), both of the same length.
        """
        pages: list[int] = []
        hashes: list[PageHash] = []
        if not self.enable_prefix_caching:
            return pages, hashes
        L = self.page_size
        parent: PageHash | None = None
        for i in range(min(len(token_ids), max_tokens) // L):
            h = hash_page(parent, token_ids[i * L:(i + 1) * L])
            page = self._by_hash.get(h)
            if page is None:
                break
            pages.append(page)
            hashes.append(h)
            parent = h
        return pages, hashes

    def acquire(self, pages: Sequence[int]) -> None:
        """Takes one more reference to pages found by `find_prefix` (cached or in use)."""
        for page in pages:
            if self._hash[page] is None:
                raise ValueError(f"page={page}: only cached pages can be shared")
            if self._ref[page] == 0:
                del self._lru[page]
            self._ref[page] += 1

    def commit(self, page_ids: Sequence[int], token_ids: Sequence[int],
               hashes: list[PageHash]) -> None:
        """Registers the newly filled full pages of one sequence in the prefix cache.

        Args:
          page_ids: the sequence's pages, in order.
          token_ids: the tokens whose K/V are computed (only full pages among them are cached).
          hashes: the sequence's chained page hashes so far; extended in place.
        """
        if not self.enable_prefix_caching:
            return
        L = self.page_size
        for i in range(len(hashes), len(token_ids) // L):
            h = hash_page(hashes[-1] if hashes else None, token_ids[i * L:(i + 1) * L])
            hashes.append(h)
            page = page_ids[i]
            # A page already hashed (shared prefix hit) keeps its hash; a duplicate of content that
            # another page already caches stays unhashed and is freed normally.
            if self._hash[page] is None and h not in self._by_hash:
                self._hash[page] = h
                self._by_hash[h] = page

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of `num_tokens` tokens occupies."""
        return pages_needed(num_tokens, self.page_size)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached page with ref 0 (they become free)."""
        while self._lru:
            page, _ = self._lru.popitem(last=False)
            h = self._hash[page]
            if h is not None and self._by_hash.get(h) == page:
                del self._by_hash[h]
            self._hash[page] = None
            self._free.append(page)

    def check_invariants(self) -> None:
        """Raises RuntimeError if the bookkeeping is inconsistent (used by tests)."""
        free, cached = set(self._free), set(self._lru)
        if len(free) != len(self._free) or free & cached or 0 in free | cached:
            raise RuntimeError("a page is listed twice or page 0 is listed")
        for page in range(1, self.num_pages):
            in_use = self._ref[page] > 0
            if in_use + (page in free) + (page in cached) != 1:
                raise RuntimeError(f"page {page} is in {in_use + (page in free) + (page in cached)}"
                                   " states")
            if page in free and self._hash[page] is not None:
                raise RuntimeError(f"free page {page} has a hash")
            if page in cached and self._hash[page] is None:
                raise RuntimeError(f"cached page {page} has no hash")
        for h, page in self._by_hash.items():
            if self._hash[page] != h:
                raise RuntimeError(f"hash index points at page {page} with another hash")
        if self.num_free + self.num_used + self.num_cached != self.num_total:
            raise RuntimeError("free + used + cached != total")
