"""The decode GEMM hooks: q/k/v (`DecodeProjection`) and o_proj / down_proj
(`ShardedRowParallel.gemm_mode`) through the Pallas skinny GEMM (interpreted on CPU) give the
hidden states and KV pages of the plain path, at tp 2 (fake CPU devices), tp 1 on a one-device
mesh and without a mesh; and the kernels really run (their pallas_calls are in the program):
the skinny GEMM, and after it `rope_write_kv` (rope + K/V write) where the KV heads are split,
and gate/up with SwiGLU's activation as one kernel (`skinny_gemm_swiglu`)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np
import pytest

from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.sharding.decode_gemm import DecodeProjection, decode_gemm_hooks
from xlaserve.sharding.specs import ShardingPlan


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                max_position_embeddings=128, dtype="float32")
    return ModelConfig(**{**base, **kw})


def _steps() -> list[StepInputs]:
    """Two ragged steps over permuted pages (page size 4; page 0 is padding): a chunk of 5
    tokens (pages 3, 1) and one of 2 (page 2) with a padding row, then one decode token each
    after that context. Several keys per query at non-zero positions, so a wrong q or rope
    shows (one token at position 0 attends to itself alone: its output is v whatever q is,
    and rope there is the identity)."""
    i32 = functools.partial(np.array, dtype=np.int32)
    table = i32([[3, 1], [2, 0]])
    prefill = StepInputs(token_ids=i32([5, 9, 200, 31, 7, 17, 42, 0]),
                         positions=i32([0, 1, 2, 3, 4, 0, 1, 0]),
                         slot_mapping=i32([12, 13, 14, 15, 4, 8, 9, 0]),
                         cu_q_lens=i32([0, 5, 7]), kv_lens=i32([5, 2]), page_table=table,
                         num_seqs=i32([2]), logits_indices=i32([4, 6]))
    decode = StepInputs(token_ids=i32([11, 64, 0, 0, 0, 0, 0, 0]),
                        positions=i32([5, 2, 0, 0, 0, 0, 0, 0]),
                        slot_mapping=i32([5, 10, 0, 0, 0, 0, 0, 0]),
                        cu_q_lens=i32([0, 1, 2]), kv_lens=i32([6, 3]), page_table=table,
                        num_seqs=i32([2]), logits_indices=i32([0, 1]))
    return [prefill, decode]


def _run(cfg, plan, *, project_fn, row_parallel_fn):
    """Hidden states of both `_steps` (rows concatenated), the skinny GEMM (all kinds),
    rope_write_kv and skinny_gemm_swiglu counts in the program, the logical KV cache after
    them, and the program's text."""
    params = jax.jit(lambda key: jax.tree.map(lambda x: x * 4.0, llama.init_params(cfg, key)),
                     out_shardings=None if plan is None else plan.param_shardings)(
        jax.random.key(0))  # x4: attention far from uniform, so q matters
    cache = (plan.init_kv_cache(4, 4) if plan is not None
             else llama.init_kv_cache(cfg, 4, 4))
    fn = jax.jit(functools.partial(
        llama.forward_hidden, cfg=cfg, attention_impl="reference",
        attention_fn=None if plan is None else plan.attention_fn,
        row_parallel_fn=row_parallel_fn, project_fn=project_fn))
    steps = _steps()
    text = fn.lower(params, steps[0], cache).as_text()
    hidden = []
    for inputs in steps:
        h, cache = fn(params, inputs, cache)
        hidden.append(np.asarray(h))
    if plan is not None:
        cache = plan.logical_kv_cache(cache)
    return (np.concatenate(hidden), text.count("skinny_gemm"), text.count("rope_write_kv"),
            [np.asarray(a) for layer in cache for a in layer], text.count("skinny_gemm_swiglu"),
            text)


def _plans(cfg: ModelConfig, tp: int) -> tuple[ShardingPlan, ShardingPlan]:
    """(the plain plan on tp devices with psum, the same with the decode GEMMs interpreted);
    skips without tp devices."""
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=tp),
                               devices=jax.devices()[:tp], attention_impl="reference")
    plain = plan.with_all_reduce("psum")
    return plain, plain.with_decode_gemm("pallas_interpret")


def _close_caches(got, want):
    """[K, P, L, H] pools equal past page 0 (the padding page: the plain path writes padding
    rows there, rope_write_kv skips them) and the steps' slots were written."""
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[:, 1:], w[:, 1:], rtol=1e-5, atol=1e-5)
        assert np.abs(w[:, 1:]).sum(axis=(0, 3)).astype(bool).sum() == 9  # 7 + 2 tokens


@pytest.mark.parametrize("tp,kv_heads", [(2, 4), (1, 4), (4, 2)], ids=["tp2", "tp1", "tp4-kvrep"])
def test_decode_gemm_equals_plain(tp, kv_heads):
    cfg = _cfg(num_kv_heads=kv_heads)
    plain, fast = _plans(cfg, tp)
    want, n_plain, _, want_cache, _, _ = _run(cfg, plain, project_fn=None,
                                              row_parallel_fn=plain.row_parallel_fn)
    assert fast.project_fn is not None and fast.row_parallel_fn.gemm_mode == "pallas_interpret"
    got, n_fast, n_rope, cache, n_swiglu, _ = _run(cfg, fast, project_fn=fast.project_fn,
                                                   row_parallel_fn=fast.row_parallel_fn)
    assert n_plain == 0 and n_fast > 0 and n_swiglu > 0, (n_plain, n_fast, n_swiglu)
    # rope + K/V write fused only where each device owns its KV heads (not at tp 4 > K 2)
    assert (n_rope > 0) == (tp <= kv_heads), n_rope
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _close_caches(cache, want_cache)
    # the same with the q/k/v epilogue left to XLA (the A/B switch)
    unfused = dataclasses.replace(fast.project_fn, fuse_rope_write=False)
    got2, _, n_rope2, cache2, _, _ = _run(cfg, fast, project_fn=unfused,
                                          row_parallel_fn=fast.row_parallel_fn)
    assert n_rope2 == 0
    np.testing.assert_allclose(got2, want, rtol=1e-5, atol=1e-5)
    _close_caches(cache2, want_cache)


def test_without_mesh():
    """One device, no mesh (the engine at tp=1): q/k/v, then also o / down, through the kernel;
    same hidden states."""
    cfg = _cfg()
    want, _, _, want_cache, _, _ = _run(cfg, None, project_fn=None, row_parallel_fn=None)
    got, n, n_rope, cache, n_swiglu, _ = _run(
        cfg, None, project_fn=DecodeProjection(None, cfg, "pallas_interpret"),
        row_parallel_fn=None)
    assert n > 0 and n_rope > 0 and n_swiglu > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _close_caches(cache, want_cache)
    row, project = decode_gemm_hooks(None, cfg, "pallas_interpret")
    assert row is not None and row.mesh is None and row.all_reduce is None
    got2, n2, _, cache2, _, _ = _run(cfg, None, project_fn=project, row_parallel_fn=row)
    assert n2 > n
    np.testing.assert_allclose(got2, want, rtol=1e-5, atol=1e-5)
    _close_caches(cache2, want_cache)


def test_qk_norm_keeps_the_unfused_epilogue():
    """Qwen3's q/k norms sit between the projection and rope: the fused epilogue is skipped,
    the skinny GEMM still runs, and the result equals the plain path."""
    cfg = _cfg(model_type="qwen3", qk_norm=True)
    want, _, _, want_cache, _, _ = _run(cfg, None, project_fn=None, row_parallel_fn=None)
    got, n, n_rope, cache, _, _ = _run(
        cfg, None, project_fn=DecodeProjection(None, cfg, "pallas_interpret"),
        row_parallel_fn=None)
    assert n > 0 and n_rope == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _close_caches(cache, want_cache)
    assert decode_gemm_hooks(None, cfg, "xla") == (None, None)


def test_mode_lists_agree():
    from xlaserve.pallas_kernels import ops
    from xlaserve.runtime.config import DECODE_GEMM_MODES

    assert DECODE_GEMM_MODES == ops.SKINNY_GEMM_MODES


def test_modes_on_cpu():
    """'xla' adds nothing; 'auto' on CPU adds nothing (the kernel is GPU-only); a bad mode is
    an error naming the field."""
    cfg = _cfg()
    plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=1),
                               devices=jax.devices()[:1], attention_impl="reference")
    for mode in ("xla", "auto"):
        p = plan.with_decode_gemm(mode)
        assert p.project_fn is None and p.row_parallel_fn is None, mode
    with pytest.raises(ValueError, match="decode_gemm"):
        plan.with_decode_gemm("cublas")


def test_auto_adds_hooks_only_for_measured_shapes(monkeypatch):
    """'auto' on a GPU: the 8B model at tp 2 gets both hooks (its local q/k/v, o and down shapes
    are in the table); at tp 1 only the q/k/v hook (the table's tp-1 o and down entries lost in
    the model and were dropped; its q/k/v entry won with the rope + K/V write kernel after it),
    and a model the table does not cover none (the program stays XLA's)."""
    from jax.sharding import Mesh

    from xlaserve.checkpoints import hf
    from xlaserve.pallas_kernels import ops
    from xlaserve.sharding.specs import ShardedRowParallel

    monkeypatch.setattr(ops, "_platform", lambda platform=None: "gpu")
    root = pathlib.Path(__file__).resolve().parents[2]
    cfg = hf.load_config(root / "bench/configs/llama3.1-8b", dtype="bfloat16")
    row1, project1 = decode_gemm_hooks(None, cfg, "auto")
    assert row1 is None and isinstance(project1, DecodeProjection)
    other = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2,
                                hidden_size=cfg.hidden_size * 2)
    assert decode_gemm_hooks(None, other, "auto") == (None, None)
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    row, project = decode_gemm_hooks(mesh, cfg, "auto", ShardedRowParallel(mesh, cfg, None))
    assert project is not None and row.gemm_mode == "auto"

