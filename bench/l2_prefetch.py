"""Does prefetching a decode GEMM's weight into L2 during a latency-bound kernel pay? (GPU only)

A batch-1 decode step at tp=2 spends ~24 us per layer in kernels that leave HBM idle (the fused
all-reduces, rope_write_kv, attention, the split combine, silu(g)*u) right before GEMMs that
are bound by reading their weights from HBM. This measures, per layer of a chain of L layers
with distinct weights (so nothing stays in L2 from the previous layer):

  spin(S)                    -> GEMM(W)   a kernel of S ns standing in for the latency-bound one
  spin(S) + prefetch(W, P)   -> GEMM(W)   the same kernel first reads W's first P bytes
                                          (ld.global.cg, 8 vectors in flight per thread), or
                                          issues L2 prefetches (one prefetch.global.L2 per
                                          128-byte line, or cp.async.bulk.prefetch.L2 chunks)
  prefetch(W, P); spin(S)    -> GEMM(W)   the prefetch as its own launch before the spin

and `hot`: the GEMM alone with the same weight in every layer (the most L2 can give), for
the 8B shape's decode GEMMs (tp=2: q/k/v, o, gate/up, down; tp=1: o), through XLA's dot or
pallas_kernels/skinny_gemm.py as the model runs them. The win is spin + GEMM without the
prefetch minus with it.

  python bench/l2_prefetch.py --out l2.json
"""

from __future__ import annotations

import argparse
import json
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm
from xlaserve.sharding.all_reduce import FFI_TARGET, _gpu_triton

THREADS = 256
ROWS, DIM = 16, 4096  # the chained activation x [16, 4096] bf16


def spin_prefetch_ptx(name: str, arch: int, mode: str, chunk: int) -> str:
    """A kernel that copies x -> out, issues L2 prefetches of w's first nchunks * chunk bytes
    (grid-stride over all threads) and spins until `spin` ns have passed since it started.

    Parameters: x, w, out (pointers); spin (u64 ns), nchunks (u64)."""
    if mode == "bulk":
        pf = f"cp.async.bulk.prefetch.L2.global [%a], {chunk};"
    elif mode == "lines":
        pf = "prefetch.global.L2::evict_normal [%a];"
    else:  # "load": real loads of 8 16-byte vectors per thread and pass (chunk = 8 x 16 bytes,
        # the vectors `stride` chunks apart), xor-folded so they are not dead code
        pf = "\n    ".join(
            [f"ld.global.cg.v4.b32 {{%v{4 * j}, %v{4 * j + 1}, %v{4 * j + 2}, %v{4 * j + 3}}}, "
             f"[%a+{16 * j}];" for j in range(8)]
            + [f"xor.b32 %acc, %acc, %v{i};" for i in range(32)])
    nvec = ROWS * DIM * 2 // 16
    body = f"""
    .reg .pred %p;
    .reg .b32 %th, %cta, %ncta, %t;
    .reg .b32 %w0, %w1, %w2, %w3, %acc, %v<32>;
    .reg .b64 %xp, %wp, %outp, %a, %off, %start, %now, %spin, %nch, %ci, %stride;
    ld.param.u64 %xp, [p_x];
    cvta.to.global.u64 %xp, %xp;
    ld.param.u64 %wp, [p_w];
    cvta.to.global.u64 %wp, %wp;
    ld.param.u64 %outp, [p_out];
    cvta.to.global.u64 %outp, %outp;
    ld.param.u64 %spin, [p_spin];
    ld.param.u64 %nch, [p_nchunks];
    mov.u64 %start, %globaltimer;
    mov.u32 %acc, 0;
    mov.u32 %th, %tid.x;
    mov.u32 %cta, %ctaid.x;
    mov.u32 %ncta, %nctaid.x;
    mad.lo.u32 %t, %cta, {THREADS}, %th;
    cvt.u64.u32 %ci, %t;
    mul.lo.u32 %t, %ncta, {THREADS};
    cvt.u64.u32 %stride, %t;
PF_LOOP:
    setp.ge.u64 %p, %ci, %nch;
    @%p bra PF_DONE;
    mul.lo.u64 %off, %ci, {chunk};
    add.u64 %a, %wp, %off;
    {pf}
    add.u64 %ci, %ci, %stride;
    bra PF_LOOP;
PF_DONE:
    setp.eq.u32 %p, %acc, 0x9E3779B9;  // never in practice: keeps the loads live
    @%p st.global.u32 [%outp], %acc;
    mad.lo.u32 %t, %cta, {THREADS}, %th;
    cvt.u64.u32 %ci, %t;
CP_LOOP:
    setp.ge.u64 %p, %ci, {nvec};
    @%p bra CP_DONE;
    mul.lo.u64 %off, %ci, 16;
    add.u64 %a, %xp, %off;
    ld.global.v4.b32 {{%w0, %w1, %w2, %w3}}, [%a];
    add.u64 %a, %outp, %off;
    st.global.v4.b32 [%a], {{%w0, %w1, %w2, %w3}};
    add.u64 %ci, %ci, %stride;
    bra CP_LOOP;
CP_DONE:
SPIN:
    mov.u64 %now, %globaltimer;
    sub.u64 %now, %now, %start;
    setp.lt.u64 %p, %now, %spin;
    @%p bra SPIN;
    ret;
"""
    return (f".version 8.0\n.target sm_{arch}\n.address_size 64\n\n"
            f".visible .entry {name}(\n    .param .u64 p_x,\n    .param .u64 p_w,\n"
            f"    .param .u64 p_out,\n    .param .u64 p_spin,\n    .param .u64 p_nchunks\n)\n"
            f".maxntid {THREADS}, 1, 1\n{{{body}}}\n")


def spin_prefetch(x: jax.Array, w: jax.Array, spin_ns: int, nbytes: int, *, ctas: int,
                  mode: str, arch: int) -> jax.Array:
    """x copied through the kernel (the chain's dependence), prefetching w's first nbytes."""
    chunk = {"bulk": 65536, "lines": 128, "load": 128}[mode]
    nchunks = nbytes // chunk
    name = f"spin_prefetch_{mode}"
    gt = _gpu_triton()
    kernel = gt.TritonKernel(name, THREADS // 32, 1, 0, spin_prefetch_ptx(name, arch, mode, chunk),
                             "", arch)
    params = [gt.create_array_parameter(0, 16) for _ in range(3)]
    params += [gt.create_scalar_parameter(spin_ns, "u64"),
               gt.create_scalar_parameter(nchunks, "u64")]
    opaque = zlib.compress(gt.TritonKernelCall(kernel, ctas, 1, 1, params).to_proto(name, b""))
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return call(x, w, name=name, opaque=opaque)


SHAPES = {  # name: (K, N, gemm, skinny tiles (block_n, block_k, splits) or None, spin ns)
    "qkv_tp2": (4096, 3072, "skinny", (32, 128, 4), 4400),
    "o_tp2": (2048, 4096, "skinny", (64, 128, 2), 9000),
    "gate_up_tp2": (4096, 14336, "xla", None, 4400),
    "down_tp2": (7168, 4096, "skinny", (64, 256, 2), 2000),
    "o_tp1": (4096, 4096, "xla", None, 13000),
}


def chain(shape: str, spin_ns: int, nbytes: int, variant: str, ctas: int,
          mode: str, arch: int):
    """The jitted L-layer chain for one variant: x -> [spin(+prefetch)] -> GEMM -> x'."""
    k, n, gemm, tiles, _ = SHAPES[shape]
    cfg = SkinnyGemmConfig(*tiles) if tiles else None

    def step(x, ws):
        for w in ws:
            if variant == "separate" and nbytes:
                x = spin_prefetch(x, w, 0, nbytes, ctas=ctas, mode=mode, arch=arch)
            if variant != "gemm_only":
                pf = nbytes if variant == "fused" else 0
                x = spin_prefetch(x, w, spin_ns, pf, ctas=ctas, mode=mode, arch=arch)
            if variant == "spin_only":
                continue
            xin = x[:, :k] if k <= DIM else jnp.concatenate([x, x[:, :k - DIM]], axis=1)
            if cfg is not None:
                y = skinny_gemm(xin, [w], config=cfg)[0]
            else:
                y = jnp.dot(xin, w, preferred_element_type=jnp.float32)
            x = x + (y[:1, :1] * 1e-30).astype(x.dtype)
        return x
    return jax.jit(step)


def time_chain(fn, x, ws, runs: int) -> float:
    """Best of 3 of `runs` back-to-back calls, in us per call."""
    jax.block_until_ready(fn(x, ws))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        y = x
        for _ in range(runs):
            y = fn(y, ws)
        jax.block_until_ready(y)
        best = min(best, (time.perf_counter() - t0) / runs * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--out", default="l2_prefetch.json")
    args = ap.parse_args()
    dev = jax.devices()[0]
    arch = int(_gpu_triton().get_compute_capability(int(dev.local_hardware_id)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((ROWS, DIM)) * 0.1, jnp.bfloat16)
    results = []
    mib = 1 << 20
    for shape in args.shapes:
        k, n, _, _, spin_ns = SHAPES[shape]
        wbytes = k * n * 2
        ws = [jax.random.normal(jax.random.PRNGKey(i), (k, n), jnp.bfloat16) * 0.02
              for i in range(args.layers)]
        sizes = sorted({min(s * mib, wbytes // 65536 * 65536) for s in (4, 8, 16, 24, 32, 48)})
        mid = sizes[len(sizes) // 2]
        variants = [("gemm_only", 0, 16, "load"), ("hot", 0, 16, "load"),
                    ("spin_only", 0, 16, "load"), ("spin", 0, 16, "load")]
        variants += [("fused", s, 132, "load") for s in sizes]
        variants += [("fused", mid, 16, "load"), ("fused", mid, 64, "load"),
                     ("separate", mid, 132, "load"), ("fused", mid, 132, "lines")]
        base = None
        for variant, nbytes, ctas, mode in variants:
            fn = chain(shape, spin_ns, nbytes,
                       "gemm_only" if variant == "hot" else variant, ctas, mode, arch)
            try:  # hot: the same weight in every layer (L2-resident when it fits)
                us = time_chain(fn, x, [ws[0]] * len(ws) if variant == "hot" else ws,
                                args.runs) / args.layers
            except Exception as e:  # noqa: BLE001 -- report and go on with the other variants
                print(f"{shape} {variant} {nbytes} {ctas} {mode}: FAILED {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
                continue
            if variant == "spin":
                base = us
            r = {"shape": shape, "k": k, "n": n, "weight_mib": wbytes / mib,
                 "variant": variant, "prefetch_mib": nbytes / mib, "ctas": ctas, "mode": mode,
                 "spin_ns": spin_ns, "us_per_layer": round(us, 3),
                 "saved_us": round(base - us, 3) if base is not None and variant in (
                     "fused", "separate") else None}
            results.append(r)
            print(json.dumps(r), flush=True)
    out = {"device": dev.device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": "python bench/l2_prefetch.py "
           + " ".join(f"--{a} {v}" for a, v in vars(args).items() if a != "shapes")
           + " --shapes " + " ".join(args.shapes), "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
