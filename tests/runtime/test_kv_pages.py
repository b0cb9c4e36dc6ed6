"""PageAllocator: page 0 reserved, ref counts, prefix cache with chained hashes, LRU reuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlaserve.runtime.kv_pages import PageAllocator, hash_page


def test_page_zero_never_handed_out_and_exhaustion():
    a = PageAllocator(9, 4)
    pages = a.allocate(8)
    assert sorted(pages) == list(range(1, 9))
    assert a.allocate(1) is None  # exhausted: nothing changes
    assert a.num_used == 8 and a.num_free == 0
    a.release(pages)
    assert a.num_free == 8 and a.num_used == 0
    a.check_invariants()


def test_double_release_and_bad_sizes_raise():
    a = PageAllocator(4, 4)
    p = a.allocate(1)
    a.release(p)
    with pytest.raises(ValueError, match="page="):
        a.release(p)
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(1, 4)
    with pytest.raises(ValueError, match="page_size"):
        PageAllocator(4, 1)


def test_prefix_cache_hit_share_and_chain():
    a = PageAllocator(16, 4)
    tokens = list(range(10))  # 2 full pages + 2 tokens
    pages = a.allocate(3)
    hashes: list[bytes] = []
    a.commit(pages, tokens, hashes)
    assert len(hashes) == 2
    assert hashes[1] == hash_page(hashes[0], tokens[4:8])
    found, fh = a.find_prefix(tokens + [99], 11)
    assert found == pages[:2] and fh == hashes
    a.acquire(found)  # shared while the owner still runs
    assert a.ref_count(pages[0]) == 2
    # A different first page breaks the chain even if the second page matches.
    assert a.find_prefix([7] + tokens[1:], 10)[0] == []
    # max_tokens keeps at least the last token uncached.
    assert a.find_prefix(tokens[:8], 7)[0] == pages[:1]
    a.release(pages)
    a.release(found)
    assert a.num_cached == 2 and a.num_free == 13  # the partial page is plain free
    a.check_invariants()


def test_lru_evicts_oldest_released_and_tail_first():
    a = PageAllocator(5, 2)  # 4 usable pages
    p1 = a.allocate(2)
    a.commit(p1, [1, 2, 3, 4], [])
    p2 = a.allocate(2)
    a.commit(p2, [5, 6, 7, 8], [])
    a.release(p1)  # released first -> evicted first; its tail page before its head
    a.release(p2)
    assert a.num_cached == 4 and a.num_free == 0
    got = a.allocate(1)
    assert got == [p1[1]]
    assert a.find_prefix([1, 2, 3, 4, 0], 4)[0] == [p1[0]]  # head still cached
    assert a.find_prefix([5, 6, 7, 8, 0], 4)[0] == p2
    a.check_invariants()


def test_prefix_caching_disabled():
    a = PageAllocator(8, 2, enable_prefix_caching=False)
    p = a.allocate(2)
    a.commit(p, [1, 2, 3, 4], [])
    a.release(p)
    assert a.num_cached == 0 and a.find_prefix([1, 2, 3, 4, 5], 4) == ([], [])


ops = st.lists(st.tuples(st.sampled_from(["alloc", "release", "commit", "hit"]),
                         st.integers(0, 5), st.integers(0, 10_000)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_allocator_invariants_under_random_operations(seq):
    a = PageAllocator(13, 2)
    held: list[tuple[list[int], list[int], list[bytes]]] = []  # (pages, tokens, hashes)
    for op, k, r in seq:
        if op == "alloc":
            pages = a.allocate(k)
            if pages is None:
                assert k > a.num_available
            else:
                toks = [(r >> i) % 2 for i in range(len(pages) * 2)]  # tiny alphabet: many hits
                held.append((pages, toks, []))
        elif op == "release" and held:
            pages, _, _ = held.pop(r % len(held))
            a.release(pages)
        elif op == "commit" and held:
            pages, toks, hashes = held[r % len(held)]
            a.commit(pages, toks[:k * 2 + 1], hashes)
        elif op == "hit" and held:
            _, toks, _ = held[r % len(held)]
            found, _ = a.find_prefix(toks, len(toks))
            a.acquire(found)
            held.append((found, toks[:len(found) * 2], []))
        a.check_invariants()
        owned = [p for pages, _, _ in held for p in pages]
        assert 0 not in owned
        for p in set(owned):  # references match owners: no page owned twice without a share
            assert a.ref_count(p) == owned.count(p)
        assert a.num_used == len(set(owned))
        assert a.num_free + a.num_used + a.num_cached == a.num_total
