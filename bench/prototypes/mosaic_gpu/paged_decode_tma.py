# ruff: noqa
# Research prototype (session 7), not part of xlaserve: run as a script on CPU (interpret) or with
# 'lower' / 'gpu' arguments to lower for CUDA. See bench/NOTES_mosaic_gpu.md.
# paged decode with emit_pipeline (index_map reads page table) + wgmma, GQA rows folded (G padded to 64)
import jax, jax.numpy as jnp, numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
try:
  from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
except ImportError:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
import sys
INTERP = InterpretGPUParams() if "gpu" not in sys.argv else None
RUN_STATE = "runstate" in sys.argv
NO_T = "not" in sys.argv
P_SMEM = "psmem" in sys.argv
ANN = "ann" in sys.argv
K,P,L,H = 2, 16, 16, 128
S, M = 2, 8
BQ = 64; PPB = 4; BKV = PPB*L   # 4 pages per kv block = 64 keys
G = 4
kp = jax.random.normal(jax.random.PRNGKey(0), (K,P,L,H), jnp.float32).astype(jnp.bfloat16)
vp = jax.random.normal(jax.random.PRNGKey(1), (K,P,L,H), jnp.float32).astype(jnp.bfloat16)
pt = jnp.array(np.random.RandomState(0).permutation(P)[:S*M].reshape(S,M) if S*M<=P else np.random.RandomState(0).randint(0,P,(S,M)), jnp.int32)
q = jax.random.normal(jax.random.PRNGKey(2), (S,K,BQ,H), jnp.float32).astype(jnp.bfloat16)  # rows padded to 64
lens = jnp.array([M*L, 5*L+3], jnp.int32)
tiling = plgpu.TilingTransform((8, 64)); swz = plgpu.SwizzleTransform(128)

def body(q_ref, k_ref, v_ref, pt_ref, len_ref, o_ref, q_smem, k_smem, v_smem, p_smem, qbar, kvbar):
  bar = [qbar.at[0], kvbar.at[0], kvbar.at[1]]
  s = lax.axis_index("s"); kh = lax.axis_index("k")
  plgpu.copy_gmem_to_smem(q_ref.at[s, kh], q_smem, bar[0])
  plgpu.barrier_wait(bar[0])
  seq_len = len_ref[s]
  nblk = (seq_len + BKV - 1) // BKV
  def blk(j, carry):
    m_i, l_i, acc = carry
    for p in range(PPB):   # one TMA per page: [L,H] bf16 = 4 KiB, page id from GMEM
      page = pt_ref[s, j*PPB + p]
      plgpu.copy_gmem_to_smem(k_ref.at[kh, page], k_smem.at[pl.ds(p*L, L)], bar[1])
      plgpu.copy_gmem_to_smem(v_ref.at[kh, page], v_smem.at[pl.ds(p*L, L)], bar[2])
    plgpu.barrier_wait(bar[1]); plgpu.barrier_wait(bar[2])
    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
      return acc_ref[...]
    if NO_T:
      sc = jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)
    else:
      sc = pl.run_scoped(qk, plgpu.ACC((BQ, BKV), jnp.float32))
    if ANN:
      kv_ids = plgpu.broadcasted_iota(jnp.int32, (BQ, BKV), 1, layout=plgpu.Layout.WGMMA) + j*BKV
    else:
      kv_ids = lax.broadcasted_iota(jnp.int32, (BQ, BKV), 1) + j*BKV
    sc = jnp.where(kv_ids < seq_len, sc, -jnp.inf)
    m2 = jnp.maximum(m_i, sc.max(1)); a = jnp.exp(m_i - m2)
    p_ = jnp.exp(sc - lax.broadcast_in_dim(m2, sc.shape, [0]))
    l_i = l_i*a + p_.sum(1); acc = acc * lax.broadcast_in_dim(a, acc.shape, [0])
    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p_.astype(jnp.bfloat16), v_smem)
      return acc_ref[...]
    if RUN_STATE:
      def pv2(acc_ref):
        plgpu.wgmma(acc_ref, p_.astype(jnp.bfloat16), v_smem)
      acc = pl.run_state(pv2)(plgpu.ACC.init(acc))
    elif P_SMEM:
      p_smem[...] = p_.astype(jnp.bfloat16)
      plgpu.commit_smem()
      def pv3(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_smem)
        return acc_ref[...]
      acc = acc + pl.run_scoped(pv3, plgpu.ACC((BQ, H), jnp.float32))
    else:
      acc = acc + pl.run_scoped(pv, plgpu.ACC((BQ, H), jnp.float32))
    return m2, l_i, acc
  init = (jnp.full((BQ,), -jnp.inf, jnp.float32), jnp.zeros((BQ,), jnp.float32), jnp.zeros((BQ,H), jnp.float32))
  if ANN:
    init = (plgpu.layout_cast(init[0], plgpu.Layout.WGMMA.reduce(1)), plgpu.layout_cast(init[1], plgpu.Layout.WGMMA.reduce(1)), plgpu.layout_cast(init[2], plgpu.Layout.WGMMA))
  m_i, l_i, acc = lax.fori_loop(0, nblk, blk, init)
  q_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(jnp.bfloat16)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[s, kh])
  plgpu.wait_smem_to_gmem(0)

f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(S,K), grid_names=("s","k"),
  scratch_types=[plgpu.SMEM((BQ,H), jnp.bfloat16, transforms=(tiling,swz)),
                 plgpu.SMEM((BKV,H), jnp.bfloat16, transforms=(tiling,swz)),
                 plgpu.SMEM((BKV,H), jnp.bfloat16, transforms=(tiling,swz)),
                 plgpu.SMEM((BQ,BKV), jnp.bfloat16, transforms=(tiling,swz)),
                 plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_arrivals=PPB, num_barriers=2)],
  compiler_params=(plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup) if 'wg' in sys.argv else (plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane) if 'lane' in sys.argv else None)),
  interpret=INTERP)
def ref():
  kk = kp[:, pt].reshape(K,S,M*L,H).astype(jnp.float32); vv = vp[:, pt].reshape(K,S,M*L,H).astype(jnp.float32)
  sc = jnp.einsum("skqh,ksth->skqt", q.astype(jnp.float32), kk)
  sc = jnp.where(jnp.arange(M*L)[None,None,None,:] < lens[:,None,None,None], sc, -jnp.inf)
  return jnp.einsum("skqt,ksth->skqh", jax.nn.softmax(sc, -1), vv)
try:
  out = jax.block_until_ready(f(q, kp, vp, pt, lens))
  print(jax.__version__, "OK maxerr", float(jnp.max(jnp.abs(out.astype(jnp.float32)-ref()))))
except Exception as e:
  import traceback; traceback.print_exc(limit=3); print("FAIL", type(e).__name__, str(e)[:600])
