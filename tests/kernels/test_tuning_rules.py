"""The tuning table's lookup rules: q-length classes and KV splits (no kernel runs)."""

from __future__ import annotations

import pytest

from xlaserve.pallas_kernels import ops, tuning


@pytest.mark.parametrize("t,s,cls", [
    (16, 1, "decode"),  # the smallest bucket at batch 1: one decode token + 15 padding rows
    (16, 8, "decode"), (256, 256, "decode"), (512, 256, "decode"),
    (64, 1, "mixed"), (128, 8, "mixed"), (2048, 256, "mixed"),
    (2048, 1, "prefill"), (4096, 8, "prefill"),
])
def test_q_len_class(t: int, s: int, cls: str) -> None:
    assert tuning.q_len_class(t, s) == cls


def test_batch1_decode_bucket_takes_the_decode_tiles_at_any_table_width() -> None:
    for width in (2112, 8224, 32832):
        cfg = tuning.lookup_config(head_dim=128, page_size=16, group=4, num_tokens=16,
                                   num_seqs=1, max_kv_len=width, num_kv_heads=8)
        dec = tuning.lookup_config(head_dim=128, page_size=16, group=4, num_tokens=16,
                                   num_seqs=8, max_kv_len=width, num_kv_heads=8)
        assert (cfg.block_q, cfg.pages_per_block, cfg.q_transposed) == (
            dec.block_q, dec.pages_per_block, dec.q_transposed)


def test_splits_grow_with_table_width_and_stop_for_big_batches() -> None:
    kw = dict(num_tokens=16, block_q=4, num_kv_heads=8, block_k=128, target_programs=384,
              min_blocks_per_split=4, max_splits=128)
    narrow = tuning.num_kv_splits(num_seqs=1, max_kv_len=2112, **kw)
    wide = tuning.num_kv_splits(num_seqs=1, max_kv_len=32832, **kw)
    assert 1 <= narrow < wide <= 128
    assert narrow <= 2112 // 128 // 4  # each split keeps >= 4 blocks of the widest sequence
    kw["num_tokens"] = 256
    assert tuning.num_kv_splits(num_seqs=256, max_kv_len=32832, **kw) == 1


@pytest.mark.parametrize("kv_heads,seqs,tiles", [
    # the 8B model's batch-1 step (T 16, S 8 bucket) at tp 2 / 1: the measured small_decode tiles
    (4, 8, (4, 12)), (8, 8, (4, 6)),
    (2, 8, (4, 12)),  # tp=4: more splits would be wanted, capped at the measured 12
    (8, 16, (8, 3)), (4, 32, (8, 3)),  # more than 64 programs: the decode entry and split rule
])
def test_small_decode_tiles(kv_heads: int, seqs: int, tiles: tuple[int, int]) -> None:
    cfg = tuning.lookup_config(head_dim=128, page_size=16, group=4, num_tokens=max(16, seqs),
                               num_seqs=seqs, max_kv_len=2064, num_kv_heads=kv_heads)
    assert (cfg.pages_per_block, cfg.num_splits) == tiles
    entry = tuning._table()["entries"]["H128_L16_G4_decode"]
    assert cfg.block_q == entry["block_q"]
    small = seqs * kv_heads <= tuning._table()["small_decode"]["max_programs"]
    # the section's warps (measured: 2) only where its tiles apply; the entry's otherwise
    assert cfg.num_warps == (tuning._table()["small_decode"]["num_warps"] if small
                             else entry["num_warps"])


def test_small_decode_leaves_unlisted_keys_alone() -> None:
    small = tuning._table()["small_decode"]
    assert small["keys"] == ["H128_L16_G4_decode"]
    entry = tuning._table()["entries"]["H128_L16_G8_decode"]  # G 8: not measured
    cfg = tuning.lookup_config(head_dim=128, page_size=16, group=8, num_tokens=16, num_seqs=8,
                               max_kv_len=2064, num_kv_heads=4)
    assert cfg.pages_per_block == entry["pages_per_block"]


@pytest.mark.parametrize("t,impl", [
    (16, "pallas"),  # batch-1 decode bucket: one Pallas launch for K and V (measured in-model)
    (32, "xla"), (512, "xla"),  # not measured in the model: XLA's scatter stays
    (1024, "pallas"), (4096, "pallas"),  # prefill-sized steps (measured in isolation)
])
def test_kv_write_choice_on_gpu(t: int, impl: str) -> None:
    assert ops.write_impl_for(t, platform="cuda") == impl


def test_kv_write_is_xla_off_gpu() -> None:
    assert {ops.write_impl_for(t, platform="cpu") for t in (16, 64, 4096)} == {"xla"}


@pytest.mark.parametrize("group,padded", [(1, 1), (3, 4), (4, 4), (5, 8), (7, 8), (8, 8)])
def test_groups_share_the_entry_of_their_padded_group(group: int, padded: int) -> None:
    # The kernel pads the group to a power of two, so G 7 runs exactly the tiles of G 8.
    assert tuning.padded_group(group) == padded
    kw = dict(head_dim=128, page_size=16, num_tokens=4096, num_seqs=1, max_kv_len=4096,
              num_kv_heads=8)
    entry = tuning._table()["entries"][tuning.table_key(128, 16, padded, "prefill")]
    cfg = tuning.lookup_config(group=group, **kw)
    assert (cfg.pages_per_block, cfg.num_warps, cfg.num_stages) == (
        entry["pages_per_block"], entry["num_warps"], entry["num_stages"])


KW = dict(head_dim=128, page_size=16, num_seqs=1, max_kv_len=4096, num_kv_heads=1)


def test_missing_group_keeps_the_default_tile_rows() -> None:
    """G 2 has no entry: the default (G 4) entry with block_q scaled to keep its q rows."""
    default = tuning._table()["default"]
    assert tuning.table_key(128, 16, 2, "prefill") not in tuning._table()["entries"]
    for q_class, t in (("prefill", 4096), ("decode", 16)):
        cfg = tuning.lookup_config(group=2, num_tokens=t, **KW)
        want_rows = max(default[q_class]["block_q"] * tuning.DEFAULT_GROUP, 16)
        assert cfg.block_q * 2 == want_rows
        assert cfg.pages_per_block == default[q_class]["pages_per_block"]


def test_kv_blocks_fit_their_budget_and_bf16_entries_stay_as_measured() -> None:
    """float32 K/V blocks past KV_TILE_BYTES get fewer pages (the float32 L 64 and L 128 prefill
    tiles did not compile on an H100); one page past it: two stages and half the q budget.
    Every bf16 table entry is used exactly as measured."""
    for key, entry in tuning._table()["entries"].items():
        h, ell, g, q_class = key.split("_")
        kw = dict(head_dim=int(h[1:]), page_size=int(ell[1:]), group=int(g[1:]), num_seqs=1,
                  num_tokens={"decode": 64, "mixed": 2048, "prefill": 4096}[q_class],
                  max_kv_len=4096, num_kv_heads=8)
        if q_class != "prefill":  # decode: 64 sequences, past small_decode's max_programs
            kw["num_seqs"] = 64
        cfg = tuning.lookup_config(**kw)
        assert tuning.q_len_class(kw["num_tokens"], kw["num_seqs"]) == q_class
        assert (cfg.pages_per_block, cfg.num_stages) == (entry["pages_per_block"],
                                                          entry["num_stages"]), key
        f32 = tuning.lookup_config(itemsize=4, **kw)
        kv_bytes = f32.pages_per_block * kw["page_size"] * kw["head_dim"] * 4
        assert kv_bytes <= tuning.KV_TILE_BYTES or f32.pages_per_block == 1
    assert tuning.fit_kv_tile(2, 2, page_size=64, head_dim=128, itemsize=4) == (
        1, 2, tuning.Q_TILE_BYTES)
    assert tuning.fit_kv_tile(1, 3, page_size=128, head_dim=128, itemsize=4) == (
        1, 2, tuning.Q_TILE_BYTES // 2)
    assert tuning.fit_kv_tile(1, 3, page_size=128, head_dim=128, itemsize=2) == (
        1, 3, tuning.Q_TILE_BYTES)
    cfg = tuning.lookup_config(head_dim=128, page_size=128, group=4, num_tokens=4096,
                               num_seqs=1, max_kv_len=4096, num_kv_heads=8, itemsize=4)
    assert cfg.block_q * 4 * 128 * 4 <= tuning.Q_TILE_BYTES // 2 and cfg.num_stages == 2


def test_float32_tiles_fit_the_q_tile_budget_and_bf16_entries_stay() -> None:
    """The table is measured in bf16; a float32 q tile past Q_TILE_BYTES gets block_q halved
    (512 x 128 f32 rows asked for 257 KiB of shared memory on an H100 and did not compile)."""
    for group in (1, 4, 8, 16):
        gp = tuning.padded_group(group)
        bf16 = tuning.lookup_config(group=group, num_tokens=4096, **KW)
        f32 = tuning.lookup_config(group=group, num_tokens=4096, itemsize=4, **KW)
        assert f32.block_q * gp * 128 * 4 <= tuning.Q_TILE_BYTES
        assert f32.block_q <= bf16.block_q
        entry = tuning._table()["entries"].get(tuning.table_key(128, 16, gp, "prefill"))
        if entry is not None:  # measured entries are used as measured in bf16
            assert bf16.block_q == max(entry["block_q"], -(-16 // gp))
    assert tuning.tile_block_q(32, group=16, head_dim=128, itemsize=4) == 8
    assert tuning.tile_block_q(32, group=4, head_dim=128, itemsize=4) == 32  # 64 KiB: fits
    assert tuning.tile_block_q(1, group=8, head_dim=128, itemsize=4) == 2  # >= 16 rows


def test_default_entries_are_the_g4_entries() -> None:
    """DEFAULT_GROUP names the group the sweep copies into the table's defaults (H128 L16 G4)."""
    table = tuning._table()
    for q_class, default in table["default"].items():
        entry = table["entries"][tuning.table_key(128, 16, tuning.DEFAULT_GROUP, q_class)]
        assert {k: entry[k] for k in default} == default


@pytest.mark.parametrize("page_size", [8, 128])
def test_missing_page_size_keeps_the_default_keys_per_block(page_size: int) -> None:
    """No L 8 / L 128 entries: pages_per_block scaled so a KV block holds the default's keys
    (before, L 128 took the default's 8 pages per block: 1024 keys per tile)."""
    default = tuning._table()["default"]
    for q_class, t in (("prefill", 4096), ("decode", 16), ("mixed", 512)):
        assert tuning.table_key(128, page_size, 4, q_class) not in tuning._table()["entries"]
        cfg = tuning.lookup_config(head_dim=128, page_size=page_size, group=4, num_tokens=t,
                                   num_seqs=8 if q_class == "mixed" else 1, max_kv_len=4096,
                                   num_kv_heads=8)
        keys = default[q_class]["pages_per_block"] * tuning.DEFAULT_PAGE_SIZE
        assert cfg.pages_per_block * page_size == max(keys, page_size)
        assert cfg.block_q == default[q_class]["block_q"]  # G 4: the default's own rows


def test_attention_table_env_override(tmp_path, monkeypatch) -> None:
    """XLASERVE_ATTENTION_TABLE replaces the table (how bench/ A/Bs a split rule in the model)."""
    import json

    kw = dict(head_dim=128, page_size=16, group=4, num_tokens=16, num_seqs=1, max_kv_len=2064,
              num_kv_heads=4)
    data = json.loads(tuning.TABLE_PATH.read_text())
    base = tuning.lookup_config(**kw).num_splits
    assert base > 3
    data["small_decode"]["max_splits"] = 3
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("XLASERVE_ATTENTION_TABLE", str(path))
    tuning._table.cache_clear()
    tuning.lookup_config.cache_clear()
    try:
        assert tuning.table_path() == path
        assert tuning.lookup_config(**kw).num_splits == 3
    finally:
        monkeypatch.delenv("XLASERVE_ATTENTION_TABLE")
        tuning._table.cache_clear()
        tuning.lookup_config.cache_clear()
    assert tuning.lookup_config(**kw).num_splits == base


def test_entry_optional_field_reaches_the_config(tmp_path, monkeypatch) -> None:
    """An entry's optional field (bench/attention_table_variant.py --set q_transposed=true)
    reaches the config, also where the small_decode section sets the tiles; without the field,
    its default. --small-set changes the section's fields."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import attention_table_variant as atv

    kw = dict(head_dim=128, page_size=16, group=4, num_tokens=16, num_seqs=8, max_kv_len=2064,
              num_kv_heads=4)
    def fresh():
        tuning.lookup_config.cache_clear()
        tuning._table.cache_clear()

    fresh()
    assert not tuning.lookup_config(**kw).q_transposed
    path = tmp_path / "table.json"
    table = json.loads(atv.TABLE.read_text())
    path.write_text(json.dumps(atv.variant(table, sets=["q_transposed=true"],
                                           small_sets=["max_splits=8"])))
    monkeypatch.setenv("XLASERVE_ATTENTION_TABLE", str(path))
    fresh()
    try:
        cfg = tuning.lookup_config(**kw)
        assert (cfg.q_transposed, cfg.num_splits) == (True, 8)
        with pytest.raises(ValueError, match="no field 'max_split'"):
            atv.variant(table, small_sets=["max_split=8"])
    finally:
        monkeypatch.delenv("XLASERVE_ATTENTION_TABLE")
        fresh()
