"""Tile choice for the Pallas ragged paged attention kernel, from a table measured on the GPU.

The table (``tuning_h100.json`` beside this file) is written by ``bench/attention_sweep.py``: for
each (head dim H, page size L, GQA group G padded to a power of two as the kernel runs it,
q-length class) it holds the fastest measured (block_q, pages_per_block, num_warps, num_stages),
and one rule for KV splits (flash-decoding):
split until the grid holds about ``target_programs`` programs, each split keeping at least
``min_blocks_per_split`` KV blocks. The optional ``small_decode`` section changes, for the
table keys it lists, the tiles of steps with few programs (at most ``max_programs`` before any
split: a handful of sequences): ``pages_per_block``, ``min_blocks_per_split`` and
``max_splits``, so each program walks fewer, shorter KV blocks (batch 1, ctx 1024, in the 8B
model on H200s: 64-key blocks and up to 12 splits took 22-47 us less per step than 128-key
blocks and 4 splits), and optionally ``num_warps`` (2 there: 35-40 us less at tp=2, no change
at tp=1, session 26). Keys missing from the table fall back to the table's
``default`` entries for the q-length class (its H128 L16 G4 entries), scaled so the tile keeps
the default's shape: block_q keeps its row count (block_q * G') and pages_per_block its keys per
KV block (pages_per_block * L; a page size of 128 took the default's 8 pages, 1024 keys); the
fallback is logged once, never silent.

The table is measured in bf16. A tile whose q rows would pass ``Q_TILE_BYTES`` (float32, or a
large group) gets block_q halved until they fit: a float32 G 16 prefill tile of 512 x 128 rows
asked Triton for 257 KiB of shared memory on an H100 (227 KiB available) and failed to compile.
Likewise a K/V block past ``KV_TILE_BYTES`` gets pages_per_block halved, down to one page; when
one page alone passes it (float32 at L 128), the q tile gets half of ``Q_TILE_BYTES`` and at
most two pipeline stages. The float32 prefill tiles of the L 64 entry and of L 128 failed on an
H100 without this (session 8).

XLASERVE_ATTENTION_TABLE names another table file (read once per process): how bench/ A/Bs a
sweep's output or a split rule inside the model.

This module reads shapes only (all static under jit); it never touches device arrays.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from xlaserve.pallas_kernels.ragged_paged_attention import (
    RaggedPagedAttentionConfig,
    padded_group,
)

log = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("tuning_h100.json")
Q_CLASSES = ("decode", "mixed", "prefill")


DECODE_MAX_TOKENS = 16  # the runner's smallest token bucket: always a decode-class bucket
DEFAULT_GROUP = 4  # the padded group of the table's default entries (H128 L16 G4)
DEFAULT_PAGE_SIZE = 16  # their page size
# Most bytes of one tile's q rows (block_q * G' x H x itemsize). 64 KiB compiles (float32 G 8
# prefill, 128 x 128 rows, H200: bench/results/session7_h200x4/tpkv_run2); 256 KiB did not
# (float32 G 16, bench/results/session7_h200x2). Both GPUs allow 227 KiB per block. The
# failure's request (q rows + 1 KiB) suggests the K/V tiles were not held in shared memory
# beside them; float32 L 32/64 table tiles (bigger K/V blocks) are not compiled yet.
Q_TILE_BYTES = 64 << 10
# Most bytes of one K (or V) block, pages_per_block * L x H x itemsize: every bf16 table entry
# is within it (at most 32 KiB); float32 L 64 (2 pages, 64 KiB) and L 128 (1 page, 64 KiB)
# prefill tiles did not compile on an H100 (bench/results/session8_h100).
KV_TILE_BYTES = 32 << 10


def q_len_class(num_tokens: int, num_seqs: int) -> str:
    """Classifies a (T bucket, S bucket) by mean q tokens per sequence slot.

    decode: T <= 2 S (q_len 1 rows, maybe a few short chunks), or T <= 16 whatever S (the
    smallest token bucket: at batch 1 it holds one decode token and 15 padding rows; classing it
    "mixed" by its mean of 16 tokens per slot took the 16-token q tiles and the 64-key KV blocks
    of mixed batches, and up to 4x the KV splits; measured on an H100 at max_model_len 8224: a
    batch-1 step 6.40 ms vs 6.04 ms at 2112); prefill: T >= 128 S (one or a few long chunks);
    mixed: everything between (decode rows plus prefill chunks).
    """
    mean = num_tokens / max(num_seqs, 1)
    if mean <= 2 or num_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    if mean >= 128:
        return "prefill"
    return "mixed"


def table_path() -> Path:
    """The table in force: XLASERVE_ATTENTION_TABLE (a sweep's output, or an A/B variant of
    the split rule) when set, else the measured table beside this file."""
    return Path(os.environ.get("XLASERVE_ATTENTION_TABLE") or TABLE_PATH)


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    path = table_path()
    if path != TABLE_PATH:
        log.info("attention tiles from %s (XLASERVE_ATTENTION_TABLE)", path)
    with open(path) as f:
        return json.load(f)


def table_key(head_dim: int, page_size: int, group: int, q_class: str) -> str:
    return f"H{head_dim}_L{page_size}_G{group}_{q_class}"


@functools.lru_cache(maxsize=None)
def _warn_missing_entry(key: str, q_class: str, entry: str) -> None:
    """Warns once per missing table key (not once per bucket shape)."""
    log.warning("ragged_paged_attention tuning: no entry %s in %s; using the default %s entry "
                "scaled to its rows and keys per block: %s", key, table_path().name, q_class, entry)


@functools.lru_cache(maxsize=None)
def _log_shrunk(key: str, itemsize: int, was: str, now: str) -> None:
    log.info("ragged_paged_attention tuning: %s with %d-byte q: %s -> %s so the tile fits "
             "shared memory (q rows <= %d KiB, K/V block <= %d KiB)", key, itemsize, was, now,
             Q_TILE_BYTES >> 10, KV_TILE_BYTES >> 10)


def tile_block_q(block_q: int, *, group: int, head_dim: int, itemsize: int,
                 budget: int = Q_TILE_BYTES) -> int:
    """block_q halved until the tile's q rows (block_q * G' x H) fit `budget` bytes, then raised
    to the 16 rows Triton dots need. `group` is the padded group G'."""
    while block_q > 1 and block_q * group * head_dim * itemsize > budget:
        block_q //= 2
    return max(block_q, -(-16 // group))


def fit_kv_tile(pages_per_block: int, num_stages: int, *, page_size: int, head_dim: int,
                itemsize: int) -> tuple[int, int, int]:
    """(pages_per_block, num_stages, q tile budget) with the K/V block within KV_TILE_BYTES:
    pages_per_block halved down to one page; if one page still passes it, at most two stages
    and half the q budget."""
    def block_bytes(p: int) -> int:
        return p * page_size * head_dim * itemsize
    while pages_per_block > 1 and block_bytes(pages_per_block) > KV_TILE_BYTES:
        pages_per_block //= 2
    if block_bytes(pages_per_block) > KV_TILE_BYTES:
        return pages_per_block, min(num_stages, 2), Q_TILE_BYTES // 2
    return pages_per_block, num_stages, Q_TILE_BYTES


@functools.lru_cache(maxsize=None)
def lookup_config(*, head_dim: int, page_size: int, group: int, num_tokens: int, num_seqs: int,
                  max_kv_len: int, num_kv_heads: int,
                  itemsize: int = 2) -> RaggedPagedAttentionConfig:
    """The tuned config for these static shapes (cached; logs a missing key once).

    `itemsize` is q's bytes per element (2 for bf16, as the table was measured; 4 for float32).
    """
    table = _table()
    q_class = q_len_class(num_tokens, num_seqs)
    # The kernel pads the group to a power of two (zero q heads), so G 3 runs the tiles of G 4
    # and G 5-7 those of G 8: the table is keyed by the padded group.
    gp = padded_group(group)
    key = table_key(head_dim, page_size, gp, q_class)
    entry = table["entries"].get(key)
    split = dict(table["split"])
    small = table.get("small_decode")
    if (entry is not None and small is not None and key in small["keys"]
            and _programs(num_tokens, num_seqs, int(entry["block_q"]), num_kv_heads)
            <= int(small["max_programs"])):
        # Few programs (a handful of sequences): shorter KV blocks and more splits, so each
        # program walks fewer blocks one after another (measured in the model, see the table)
        entry = {**entry, "pages_per_block": int(small["pages_per_block"]),
                 "num_warps": int(small.get("num_warps", entry["num_warps"]))}
        split["min_blocks_per_split"] = int(small["min_blocks_per_split"])
        split["max_splits"] = min(int(split["max_splits"]), int(small["max_splits"]))
    if entry is None:
        default = table["default"][q_class]
        # Keep the default tile's shape: its rows (block_q * G'; the measured entries of G 1/4/8
        # hold about the same rows per class, prefill 64-128 and decode 16, not the same
        # block_q) and its keys per KV block (pages_per_block * L).
        entry = {**default,
                 "block_q": max(1, int(default["block_q"]) * DEFAULT_GROUP // gp),
                 "pages_per_block": max(1, int(default["pages_per_block"]) * DEFAULT_PAGE_SIZE
                                        // page_size)}
        _warn_missing_entry(key, q_class, json.dumps(entry, sort_keys=True))
    pages_per_block, num_stages, q_budget = fit_kv_tile(
        int(entry["pages_per_block"]), int(entry["num_stages"]), page_size=page_size,
        head_dim=head_dim, itemsize=itemsize)
    block_q = int(entry["block_q"])
    fitted = tile_block_q(block_q, group=gp, head_dim=head_dim, itemsize=itemsize,
                          budget=q_budget)
    if (fitted, pages_per_block, num_stages) != (block_q, int(entry["pages_per_block"]),
                                                 int(entry["num_stages"])):
        _log_shrunk(key, itemsize, f"block_q {block_q}, pages_per_block "
                    f"{entry['pages_per_block']}, num_stages {entry['num_stages']}",
                    f"{fitted}, {pages_per_block}, {num_stages}")
    block_q = fitted
    block_k = pages_per_block * page_size
    num_splits = num_kv_splits(num_tokens=num_tokens, num_seqs=num_seqs, block_q=block_q,
                               num_kv_heads=num_kv_heads, max_kv_len=max_kv_len, block_k=block_k,
                               target_programs=int(split["target_programs"]),
                               min_blocks_per_split=int(split["min_blocks_per_split"]),
                               max_splits=int(split["max_splits"]))
    return RaggedPagedAttentionConfig(block_q=block_q,
                                      pages_per_block=pages_per_block,
                                      num_splits=num_splits, num_warps=int(entry["num_warps"]),
                                      num_stages=num_stages,
                                      key_gather=bool(entry.get("key_gather", False)),
                                      q_transposed=bool(entry.get("q_transposed", False)))


def num_kv_splits(*, num_tokens: int, num_seqs: int, block_q: int, num_kv_heads: int,
                  max_kv_len: int, block_k: int, target_programs: int, min_blocks_per_split: int,
                  max_splits: int) -> int:
    """KV splits so that few long tiles still fill the GPU (flash-decoding).

    Programs without splits: about max(cdiv(T, block_q), min(S, T)) tiles times KV heads. Split
    only while each split keeps >= min_blocks_per_split KV blocks of the longest possible
    sequence (page-table width times page size). The sweep measured this rule on decode only.
    """
    programs = _programs(num_tokens, num_seqs, block_q, num_kv_heads)
    if programs >= target_programs:
        return 1
    want = -(-target_programs // programs)
    most = max(1, (max_kv_len // block_k) // max(min_blocks_per_split, 1))
    return max(1, min(want, most, max_splits))


def _programs(num_tokens: int, num_seqs: int, block_q: int, num_kv_heads: int) -> int:
    """About the programs with work before any split: the real q tiles times KV heads."""
    tiles = max(-(-num_tokens // block_q), min(num_seqs, num_tokens))
    return max(tiles * num_kv_heads, 1)
