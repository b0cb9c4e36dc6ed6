# ruff: noqa
# Research prototype (session 7), not part of xlaserve: run as a script on CPU (interpret) or with
# 'lower' / 'gpu' arguments to lower for CUDA. See bench/NOTES_mosaic_gpu.md.
# emit_pipeline: one page per step, index_map reads page table from GMEM ref; simple sum of K to test gather
import sys, jax, jax.numpy as jnp, numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
try:
  from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
except ImportError:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
K,P,L,H = 2, 16, 16, 128; S, M = 2, 6
kp = jax.random.normal(jax.random.PRNGKey(0), (K,P,L,H), jnp.float32).astype(jnp.bfloat16)
pt = jnp.array(np.random.RandomState(0).permutation(P)[:S*M].reshape(S,M), jnp.int32)
lens = jnp.array([6, 4], jnp.int32)   # pages used per seq (dynamic pipeline grid)
def body(k_ref, pt_ref, n_ref, o_ref, o_smem):
  s = lax.axis_index("s"); kh = lax.axis_index("k")
  def step(idx, k_smem, carry):
    return carry + k_smem[...].astype(jnp.float32)
  pipe = plgpu.emit_pipeline(step, grid=(n_ref[s],),
      in_specs=[plgpu.BlockSpec((None, L, H), lambda j: (pt_ref[s, j], 0, 0))],
      max_concurrent_steps=3, init_carry=jnp.zeros((L, H), jnp.float32))
  acc = pipe(k_ref.at[kh])
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, kh])
  plgpu.wait_smem_to_gmem(0)
interp = None if "lower" in sys.argv else InterpretGPUParams()
f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((S,K,L,H), jnp.float32), grid=(S,K), grid_names=("s","k"),
   scratch_types=[plgpu.SMEM((L,H), jnp.float32)], interpret=interp,
   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup) if "wg" in sys.argv else None)
ref = jnp.stack([jnp.stack([kp[k][pt[s,:lens[s]]].astype(jnp.float32).sum(0) for k in range(K)]) for s in range(S)])
try:
  if interp is None:
    jax.jit(f).trace(kp, pt, lens).lower(lowering_platforms=("cuda",)); print(jax.__version__, "LOWERED OK")
  else:
    out = f(kp, pt, lens); print(jax.__version__, "OK maxerr", float(jnp.abs(out-ref).max()))
except Exception as e:
  print(jax.__version__, "FAIL", type(e).__name__, str(e)[:400])
