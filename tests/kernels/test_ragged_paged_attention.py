"""Ragged paged attention: the Pallas kernel (interpreted on CPU, compiled on GPU) vs the reference.

`RaggedBatch` draws random ragged batches: q lengths include 1, 7, L-1, L, L+1 and long chunks,
page tables are random permutations of the pool (page 0 stays the padding page), and the S bucket
holds padded sequences past num_seqs with garbage metadata that must not matter.
`TestRaggedPagedAttention` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestRaggedPagedAttentionInterpret` runs the same tests with interpret=True on CPU (CI).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels.ragged_paged_attention import (
    RaggedPagedAttentionConfig,
    _work_list,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
    write_kv_pages_reference,
)

Cfg = RaggedPagedAttentionConfig


@dataclasses.dataclass
class RaggedBatch:
    """One random ragged batch; `args` is the op's positional arguments."""

    q: jax.Array
    k_pages: jax.Array
    v_pages: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    num_real_tokens: int

    @property
    def args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_table,
                self.cu_q_lens, self.num_seqs)


def make_batch(seed: int, q_lens: list[int], *, page_size: int, head_dim: int, group: int,
               num_kv_heads: int = 2, dtype=jnp.float32, extra_seqs: int = 2,
               extra_tokens: int = 5, max_context: int | None = None,
               garbage_padding: bool = True) -> RaggedBatch:
    """Random batch: context before each chunk is random (0 for some), tables permuted."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    s_max = num_seqs + extra_seqs
    ctx = [int(rng.integers(0, 3 * page_size)) if i % 3 else 0 for i in range(num_seqs)]
    kv_lens = [q + c for q, c in zip(q_lens, ctx)]
    if max_context is not None:
        kv_lens = [max(q, min(k, max_context)) for q, k in zip(q_lens, kv_lens)]
    pages_needed = [-(-k // page_size) for k in kv_lens]
    m_pages = max(pages_needed) + 1
    num_pages = sum(pages_needed) + 4
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)  # never page 0
    table = np.zeros((s_max, m_pages), np.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        table[s, :n] = perm[used:used + n]
        used += n
    kl = np.zeros(s_max, np.int32)
    kl[:num_seqs] = kv_lens
    cu = np.zeros(s_max + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    garbage_lens = rng.integers(1, 50, size=extra_seqs)
    garbage_table = rng.integers(0, num_pages, size=(extra_seqs, m_pages))
    if garbage_padding:  # padded sequences: metadata that must be ignored
        kl[num_seqs:] = garbage_lens
        table[num_seqs:] = garbage_table
    t_real = int(sum(q_lens))
    t_total = t_real + extra_tokens
    n_heads = num_kv_heads * group
    q = rng.standard_normal((t_total, n_heads, head_dim)).astype(np.float32)
    if garbage_padding:
        q[t_real:] = np.nan  # padded rows must never leak into real rows
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = rng.standard_normal(shape).astype(np.float32)
    v_pages = rng.standard_normal(shape).astype(np.float32)
    return RaggedBatch(jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype),
                       jnp.asarray(v_pages, dtype), jnp.asarray(kl), jnp.asarray(table),
                       jnp.asarray(cu), jnp.asarray([num_seqs], jnp.int32), t_real)


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out64 = np.asarray(out, np.float64)
    ref64 = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out64 - ref64) / np.linalg.norm(ref64))


def tolerance(dtype, interpret: bool = True) -> float:
    """bf16: 1e-2 (the issue's bar). float32: 2e-5 interpreted; compiled, 1e-3 allows the
    Triton lowering running float32 dots on tf32 tensor cores (about 3e-4)."""
    if dtype == jnp.bfloat16:
        return 1e-2
    return 2e-5 if interpret else 1e-3


def standard_q_lens(page_size: int, long_chunk: int) -> list[int]:
    return [1, 7, page_size - 1, page_size, page_size + 1, 1, long_chunk, 1]


# (page size, head dim, group, dtype, config): covers L 16/32/64, H 64/128, G 1/4/8, both dtypes,
# decode-sized and prefill-sized tiles, one and several pages per KV block.
CASES = [
    (16, 64, 1, jnp.float32, Cfg(block_q=16, pages_per_block=2)),
    (16, 128, 4, jnp.bfloat16, Cfg(block_q=4, pages_per_block=4)),
    # the 8B batch-1 decode tiles (tuning_h100.json small_decode): 2 warps, 12 splits
    (16, 128, 4, jnp.bfloat16, Cfg(block_q=4, pages_per_block=4, num_splits=12, num_warps=2,
                                   key_gather=True, num_stages=3)),
    (16, 128, 4, jnp.bfloat16, Cfg(block_q=8, pages_per_block=4, key_gather=True)),
    (16, 64, 8, jnp.float32, Cfg(block_q=2, pages_per_block=1)),
    (32, 64, 4, jnp.float32, Cfg(block_q=8, pages_per_block=2, key_gather=True)),
    (32, 128, 8, jnp.bfloat16, Cfg(block_q=4, pages_per_block=1)),
    (32, 64, 1, jnp.bfloat16, Cfg(block_q=32, pages_per_block=1)),
    (64, 64, 4, jnp.bfloat16, Cfg(block_q=16, pages_per_block=1)),
    (64, 128, 1, jnp.float32, Cfg(block_q=16, pages_per_block=1)),  # f32: fits shared memory
    (64, 64, 8, jnp.float32, Cfg(block_q=2, pages_per_block=1, num_splits=3)),
    (16, 128, 4, jnp.bfloat16, Cfg(block_q=16, pages_per_block=4, key_gather=True,
                                   q_transposed=True)),
    (32, 64, 2, jnp.float32, Cfg(block_q=8, pages_per_block=2, num_splits=2, q_transposed=True)),
]


def _case_id(case) -> str:
    page_size, head_dim, group, dtype, cfg = case
    return (f"L{page_size}-H{head_dim}-G{group}-{jnp.dtype(dtype).name}-bq{cfg.block_q}"
            f"-ppb{cfg.pages_per_block}-sp{cfg.num_splits}{'-kg' if cfg.key_gather else ''}"
            f"{'-qt' if cfg.q_transposed else ''}"
            f"{f'-w{cfg.num_warps}' if cfg.num_warps != 4 else ''}")


class TestRaggedPagedAttention(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    def run_kernel(self, batch: RaggedBatch, cfg: Cfg, **kwargs) -> jax.Array:
        return ragged_paged_attention(*batch.args, config=cfg, interpret=self.INTERPRET, **kwargs)

    def check(self, batch: RaggedBatch, cfg: Cfg, **kwargs) -> None:
        sm_scale = batch.q.shape[-1] ** -0.5
        out = self.run_kernel(batch, cfg, sm_scale=sm_scale, **kwargs)
        ref = ragged_paged_attention_reference(*batch.args, sm_scale=sm_scale, **kwargs)
        t = batch.num_real_tokens
        assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
        assert np.isfinite(np.asarray(out, np.float32)).all(), "non-finite output"
        err = relative_error(out[:t], ref[:t])
        assert err < tolerance(batch.q.dtype, self.INTERPRET), f"relative error {err}"
        assert not np.asarray(out[t:], np.float32).any(), "padded rows must be 0"

    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case):
        page_size, head_dim, group, dtype, cfg = case
        long_chunk = 2 * page_size + 19
        batch = make_batch(page_size + head_dim + group, standard_q_lens(page_size, long_chunk),
                           page_size=page_size, head_dim=head_dim, group=group, dtype=dtype)
        self.check(batch, cfg)

    @pytest.mark.parametrize("kwargs", [dict(sliding_window=21), dict(soft_cap=3.0),
                                        dict(sliding_window=5, soft_cap=2.0)],
                             ids=["window", "softcap", "window-softcap"])
    @pytest.mark.parametrize("num_splits", [1, 2])
    def test_window_and_soft_cap(self, kwargs, num_splits):
        batch = make_batch(7, [1, 16, 40, 3], page_size=16, head_dim=64, group=4)
        self.check(batch, Cfg(block_q=4, pages_per_block=1, num_splits=num_splits), **kwargs)

    def test_kv_splits_long_decode(self):
        """Flash-decoding: few sequences, long contexts, many splits (some empty)."""
        batch = make_batch(3, [1, 1, 5], page_size=16, head_dim=64, group=4, extra_tokens=0)
        batch = dataclasses.replace(batch, kv_lens=batch.kv_lens.at[:3].set(
            jnp.asarray([1, 40, 48])))
        self.check(batch, Cfg(block_q=4, pages_per_block=1, num_splits=5))

    def test_padded_rows_do_not_leak(self):
        """Same real rows whatever the padding holds (NaN q rows, garbage padded sequences)."""
        kwargs = dict(page_size=16, head_dim=64, group=4, extra_tokens=9)
        dirty = make_batch(11, [3, 17, 1], garbage_padding=True, **kwargs)
        clean = make_batch(11, [3, 17, 1], garbage_padding=False, **kwargs)
        cfg = Cfg(block_q=8, pages_per_block=2)
        out_dirty = self.run_kernel(dirty, cfg, sm_scale=0.125)
        out_clean = self.run_kernel(clean, cfg, sm_scale=0.125)
        t = dirty.num_real_tokens
        np.testing.assert_array_equal(np.asarray(out_dirty[:t]), np.asarray(out_clean[:t]))
        assert not np.asarray(out_dirty[t:]).any()

    def test_empty_batch(self):
        batch = make_batch(5, [4], page_size=16, head_dim=64, group=4)
        batch = dataclasses.replace(batch, num_seqs=jnp.asarray([0], jnp.int32),
                                    num_real_tokens=0)
        out = self.run_kernel(batch, Cfg(block_q=4, pages_per_block=1), sm_scale=0.1)
        assert not np.asarray(out).any()

    @pytest.mark.parametrize("page_size", [8, 128])
    def test_page_sizes_without_table_entries(self, page_size):
        """L 8 and L 128 have no table entries: the default tiles scaled to their keys per
        block run and match (decode rows and a chunk longer than a page, after random contexts)."""
        batch = make_batch(page_size, [1, page_size + 5, 1], page_size=page_size, head_dim=64,
                           group=4, dtype=jnp.bfloat16)
        self.check(batch, None)

    @pytest.mark.parametrize("q_lens", [[700, 1], [1] * 8], ids=["prefill", "decode"])
    @pytest.mark.parametrize("page_size,group", [(16, 8), (16, 16), (32, 4), (64, 4), (8, 4),
                                                 (128, 4)])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_table_tiles_compile_and_match(self, dtype, page_size, group, q_lens):
        """config=None: the tuning table's tiles as the model gets them, G 16 (no entry: the
        default scaled to its rows), the L 32/64 entries, and float32 (bf16-measured tiles
        shrunk to fit shared memory; G 16 float32 prefill tiles did not compile on an H100
        before), and page sizes 8 and 128 (no entries: the default scaled to its keys per
        block). Session 7 ran the L16 cases on an H200; the others are not run yet."""
        if self.INTERPRET:
            pytest.skip("the table's tiles are a GPU matter (shared memory, compile)")
        batch = make_batch(group + len(q_lens), q_lens, page_size=page_size, head_dim=128,
                           group=group, dtype=dtype)
        self.check(batch, None)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_write_kv_pages(self, dtype):
        rng = np.random.default_rng(0)
        k_heads, num_pages, page_size, head_dim, t = 2, 9, 16, 64, 13
        shape = (k_heads, num_pages, page_size, head_dim)
        k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
        v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
        k_new = jnp.asarray(rng.standard_normal((t, k_heads, head_dim)), dtype)
        v_new = jnp.asarray(rng.standard_normal((t, k_heads, head_dim)), dtype)
        slots = rng.permutation(np.arange(page_size, num_pages * page_size))[:t]
        slots = jnp.asarray(slots.astype(np.int32))
        got = write_kv_pages(k_pages, v_pages, k_new, v_new, slots, interpret=self.INTERPRET)
        want = write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slots)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


class TestRaggedPagedAttentionInterpret(TestRaggedPagedAttention):
    """The same tests through the Pallas interpreter: runs on CPU in CI."""

    INTERPRET = True


@pytest.mark.slow
@pytest.mark.parametrize("page_size,group", [(16, 8), (64, 4)])
def test_long_prefill_chunk_interpret(page_size, group):
    """A 700-token chunk after 300 cached tokens, next to decode rows."""
    batch = make_batch(21, [1, 700, 1], page_size=page_size, head_dim=128, group=group,
                       dtype=jnp.bfloat16, max_context=1000)
    TestRaggedPagedAttentionInterpret().check(batch, Cfg(block_q=32, pages_per_block=2))


def test_work_list_covers_every_token_once():
    """Every row, padding rows included, is in exactly one tile; padding tiles see no keys."""
    q_lens = [5, 0, 1, 33, 16]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens + [0, 0])]).astype(np.int32))
    kv = jnp.asarray([9, 0, 4, 40, 16, 7, 7], jnp.int32)
    meta = np.asarray(_work_list(kv, cu, jnp.asarray([5], jnp.int32), num_tokens=60,
                                 block_q=8))
    covered = []
    for seq, t0, t_end, pos0 in meta.T:
        if t_end > t0:
            covered += list(range(t0, min(t0 + 8, t_end)))
            if t0 < sum(q_lens):
                assert pos0 == int(kv[seq]) - q_lens[seq] + (t0 - int(cu[seq]))
            else:
                assert t_end == 60 and pos0 + 8 <= 0  # padding: no keys
    assert sorted(covered) == list(range(60))


@pytest.mark.parametrize("kwargs", [dict(block_q=3), dict(pages_per_block=0),
                                    dict(num_splits=0), dict(num_warps=6)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        Cfg(**kwargs)


def test_kernel_rejects_bad_shapes():
    batch = make_batch(0, [3], page_size=16, head_dim=64, group=4)
    with pytest.raises(ValueError, match="q must be"):
        ragged_paged_attention(batch.q[0], *batch.args[1:], sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="rows < 16"):  # compiled tiles need >= 16 rows
        ragged_paged_attention(*batch.args, sm_scale=1.0, config=Cfg(block_q=1))


def test_dispatcher_never_falls_back_silently(caplog):
    batch = make_batch(1, [1, 9], page_size=16, head_dim=64, group=4)
    avail = ops.available_implementations("cpu")
    assert avail["reference"] == "available"
    assert avail["pallas_triton"] != "available"
    assert ops.resolve_impl("auto", "gpu") == "pallas_triton"
    assert ops.resolve_impl("auto", "cpu") == "reference"
    with pytest.raises(ValueError, match="impl="):
        ops.ragged_paged_attention(*batch.args, sm_scale=0.1, impl="nope")
    with pytest.raises(RuntimeError, match="pallas_triton"):
        ops.resolve_impl("pallas_triton", "cpu")
    if jax.default_backend() == "gpu":
        return  # the rest checks the CPU choice
    ops._log_choice.cache_clear()  # an earlier test may have logged this shape class already
    with caplog.at_level(logging.INFO, logger=ops.__name__):
        out = ops.ragged_paged_attention(*batch.args, sm_scale=0.1, impl="auto")
        ops.ragged_paged_attention(*batch.args, sm_scale=0.1, impl="auto")
    chosen = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert len(chosen) == 1, chosen  # logged, and once per (platform, shape class)
    assert "'reference' on cpu" in chosen[0] and "requested 'auto'" in chosen[0]
    ref = ragged_paged_attention_reference(*batch.args, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out[:10]), np.asarray(ref[:10]), rtol=1e-6)
    out_interp = ops.ragged_paged_attention(*batch.args, sm_scale=0.1, impl="pallas_interpret")
    assert relative_error(out_interp[:10], ref[:10]) < 2e-5


@pytest.mark.parametrize("version,deprecated", [("0.10.2", False), ("0.11.2", True),
                                                ("0.12.0.dev20261101", True)])
def test_info_says_when_jax_deprecates_the_triton_backend(monkeypatch, version, deprecated):
    """`xlaserve info` and the profile list the implementations: on jax >= 0.11 the Pallas
    Triton backend is deprecated, which the GPU entry says (it still resolves and runs)."""
    monkeypatch.setattr(jax, "__version__", version)
    triton = ops.available_implementations("gpu")["pallas_triton"]
    assert triton.startswith("available")
    assert ("deprecates the Pallas Triton backend" in triton) == deprecated
    assert ops.resolve_impl("pallas_triton", "gpu") == "pallas_triton"
