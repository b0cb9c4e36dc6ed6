"""Ragged paged attention on the GPU: correctness, speed, and comparisons.

Sections (``--sections``, comma separated):
  roof     copy bandwidth, read-only bandwidth and bf16 matmul rate measured in this run
  check    compiled kernel vs the pure-jnp reference on random ragged batches
  decode   batch 1..256 x context 512..32k (q_len 1 per sequence)
  prefill  one causal chunk of 256..8k tokens from an empty cache
  mixed    decode rows plus one prefill chunk in the same launch
  scan     decode B=64 ctx 1024 over a grid of our tile configs and of jax paged_attention's
           parameters (k_splits, pages_per_compute_block), each checked against the reference
  write    K/V page write: XLA scatter vs Pallas kernel, both into donated pools
  model    greedy tokens of a small random Llama with impl="reference" vs "pallas_triton"

Model of every case: 32 q heads, 8 KV heads, head dim 128, page size 16, bf16 (as in the issue).
Reports TB/s (K/V bytes read plus q and o) and TFLOP/s (causal), beside (a) the reference under
XLA, (b) jax.experimental.pallas.ops.gpu.paged_attention (decode) and (c)
jax.nn.dot_product_attention(implementation="cudnn") (dense causal prefill of the same size).
Writes one JSON file under --out with device, jax version and command.

    PYTHONUNBUFFERED=1 python bench/attention.py --out bench/results --sections all
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import traceback
from typing import Any

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import jax.numpy as jnp
import numpy as np

import common
from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.tuning import lookup_config

N_HEADS, K_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16


@dataclasses.dataclass
class Case:
    """One benchmark batch: the op's arguments plus its byte and FLOP counts."""

    name: str
    args: tuple[jax.Array, ...]
    q_lens: list[int]
    kv_lens: list[int]
    bytes: float
    flops: float


def make_case(name: str, q_lens: list[int], kv_lens: list[int], *, seed: int = 0,
              n_heads: int = N_HEADS, k_heads: int = K_HEADS, head_dim: int = HEAD_DIM,
              page_size: int = PAGE, dtype: Any = DTYPE) -> Case:
    """Random q and pools; each sequence's pages are a random permutation of the pool."""
    rng = np.random.default_rng(seed)
    s = len(q_lens)
    pages = [-(-k // page_size) for k in kv_lens]
    m = max(pages)
    num_pages = sum(pages) + 1
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    table = np.zeros((s, m), np.int32)
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used:used + n]
        used += n
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    t = sum(q_lens)
    q = jax.random.normal(k1, (t, n_heads, head_dim), dtype)
    shape = (k_heads, num_pages, page_size, head_dim)
    k_pages = jax.random.normal(k2, shape, dtype)
    v_pages = jax.random.normal(k3, shape, dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    args = (q, k_pages, v_pages, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table),
            jnp.asarray(cu), jnp.asarray([s], jnp.int32))
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * sum(kv_lens) * k_heads * head_dim * itemsize
    qo_bytes = 2 * t * n_heads * head_dim * itemsize
    # Causal FLOPs: row i of a chunk sees (kv_len - q_len + i + 1) keys; QK and PV 2 each.
    keys = sum(sum(kl - ql + i + 1 for i in range(ql)) for ql, kl in zip(q_lens, kv_lens))
    flops = 4.0 * keys * n_heads * head_dim
    return Case(name, args, q_lens, kv_lens, kv_bytes + qo_bytes, flops)


# Peers that take the same batch (q [B, N, H], the same pages and table): their output is checked
# against the reference ("correct" in the row; a wrong one is flagged where its time is printed).
# cuDNN's dense prefill runs on its own random data.
SAME_OP_PEERS = ("jax_paged_attention",)

INTERPRET = False  # --interpret: dry-run the script's logic on CPU (tiny shapes only)


def ours(case: Case, config: rpa.RaggedPagedAttentionConfig | None = None):
    head_dim = case.args[0].shape[-1]
    fn = jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=head_dim ** -0.5,
                                   config=config, interpret=INTERPRET))
    return fn, case.args


def reference_fits(case: Case) -> bool:
    """The reference gathers [K, T, M*L, H] in f32: skip it where that passes ~6 GB."""
    q, k_pages, table = case.args[0], case.args[1], case.args[4]
    k_heads, _, page_size, head_dim = k_pages.shape
    s_keys = table.shape[1] * page_size
    return k_heads * len(q) * s_keys * head_dim * 4 * 3 < 6e9


def record(case: Case, seconds: float, roof: dict[str, float] | None = None) -> dict[str, float]:
    """Time, rates, and (given the run's ceilings) the fraction of each ceiling reached."""
    out = {"us": seconds * 1e6, "TB/s": case.bytes / seconds / 1e12,
           "TFLOP/s": case.flops / seconds / 1e12}
    roof = roof or {}
    for key, ceiling, rate in (("frac_copy_bw", "copy_bytes_per_s", case.bytes),
                               ("frac_read_bw", "read_bytes_per_s", case.bytes),
                               ("frac_matmul", "matmul_flops_per_s", case.flops)):
        if ceiling in roof:
            out[key] = rate / seconds / roof[ceiling]
    return out


def time_impls(case: Case, roof: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """Times our kernel (tuned config), the reference and the given comparison functions."""
    row: dict[str, Any] = {"case": case.name, "bytes": case.bytes, "flops": case.flops}
    fn, args = ours(case)
    cfg = lookup_config(head_dim=HEAD_DIM, page_size=PAGE, group=N_HEADS // K_HEADS,
                        num_tokens=len(args[0]), num_seqs=args[4].shape[0],
                        max_kv_len=args[4].shape[1] * PAGE, num_kv_heads=K_HEADS)
    row["config"] = dataclasses.asdict(cfg)
    row["ours"] = record(case, common.time_in_jit(fn, *args), roof)
    row["ours"]["us_dispatch_bound"] = common.time_fn(fn, *args) * 1e6
    if reference_fits(case):
        ref = jax.jit(functools.partial(rpa.ragged_paged_attention_reference,
                                        sm_scale=HEAD_DIM ** -0.5))
        try:
            row["reference_xla"] = record(case, common.time_in_jit(ref, *args, n=3, repeats=3))
        except Exception as e:  # noqa: BLE001 - report and go on
            row["reference_xla"] = {"error": repr(e)[:300]}
    for name, (f, f_args) in extra.items():
        try:
            row[name] = record(case, common.time_in_jit(f, *f_args))
        except Exception as e:  # noqa: BLE001
            row[name] = {"error": repr(e)[:300]}
            continue
        if name in SAME_OP_PEERS and reference_fits(case):
            # A peer's speed counts only if it computes the same thing (checked after timing,
            # outside the timed calls).
            try:
                expect = rpa.ragged_paged_attention_reference(*case.args,
                                                              sm_scale=HEAD_DIM ** -0.5)
                err = common.relative_error(f(*f_args), expect)
                row[name]["rel_err_vs_reference"] = err
                row[name]["correct"] = err < 1e-2
            except Exception as e:  # noqa: BLE001
                row[name]["correct"] = False
                row[name]["check_error"] = repr(e)[:300]
    msg = f"{case.name:34s} ours {row['ours']['us']:9.1f} us {row['ours']['TB/s']:6.2f} TB/s " \
          f"{row['ours']['TFLOP/s']:7.1f} TFLOP/s"
    for name in ["reference_xla", *extra]:
        if "us" in row.get(name, {}):
            wrong = " (WRONG OUTPUT)" if row[name].get("correct") is False else ""
            msg += f" | {name} {row[name]['us']:9.1f} us{wrong}"
    print(msg, flush=True)
    return row


def jax_paged(case: Case):
    """jax.experimental.pallas.ops.gpu.paged_attention on the same decode batch."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    q, k_pages, v_pages, kv_lens, table, _, _ = case.args
    m = table.shape[1]
    k_splits = 16 if m % 16 == 0 else 1
    fn = jax.jit(functools.partial(jpa.paged_attention, k_splits=k_splits, interpret=INTERPRET))
    # jax's kernel applies no softmax scale: q goes in pre-scaled (outside the timed call).
    q = (q.astype(jnp.float32) * HEAD_DIM ** -0.5).astype(q.dtype)
    return fn, (q, k_pages, v_pages, table, kv_lens)


def cudnn_dense(case: Case):
    """jax.nn.dot_product_attention (cuDNN) over a dense causal chunk of the same size."""
    t = len(case.args[0])
    key = jax.random.key(7)
    q = jax.random.normal(key, (1, t, N_HEADS, HEAD_DIM), DTYPE)
    k = jax.random.normal(key, (1, t, K_HEADS, HEAD_DIM), DTYPE)
    v = jax.random.normal(key, (1, t, K_HEADS, HEAD_DIM), DTYPE)
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation="cudnn"))
    return fn, (q, k, v)


def section_check(results: dict[str, Any]) -> None:
    rows = []
    rng = np.random.default_rng(0)
    for i, (q_lens, kv_extra) in enumerate([
            ([1] * 13, 500), ([1, 7, 15, 16, 17, 300, 1], 100), ([2048], 0), ([1, 1, 4000], 3000)]):
        kv_lens = [q + int(rng.integers(0, kv_extra + 1)) for q in q_lens]
        case = make_case(f"check{i}", q_lens, kv_lens, seed=i)
        ref = rpa.ragged_paged_attention_reference(*case.args, sm_scale=HEAD_DIM ** -0.5)
        configs = [None, rpa.RaggedPagedAttentionConfig(block_q=4, pages_per_block=4,
                                                        num_splits=3),
                   rpa.RaggedPagedAttentionConfig(block_q=16, pages_per_block=4,
                                                  key_gather=True)]
        for cfg in configs:
            try:
                fn, args = ours(case, cfg)
                err = common.relative_error(fn(*args), ref)
                rows.append({"case": case.name, "config": cfg and dataclasses.asdict(cfg),
                             "rel_err": err, "ok": err < 1e-2})
            except Exception:  # noqa: BLE001
                rows.append({"case": case.name, "config": cfg and dataclasses.asdict(cfg),
                             "error": traceback.format_exc()[-2000:]})
                print(traceback.format_exc()[-3000:], flush=True)
            print("check", rows[-1].get("rel_err", rows[-1].get("error", "")[-200:]), flush=True)
    results["check"] = rows


def section_decode(results: dict[str, Any], roof: dict[str, float], quick: bool) -> None:
    rows = []
    grid = [(1, 512), (1, 4096), (1, 32768), (8, 1024), (8, 32768), (64, 512), (64, 1024),
            (64, 4096), (256, 1024), (256, 4096)]
    if quick:
        grid = [(1, 32768), (64, 1024)]
    for b, ctx in grid:
        case = make_case(f"decode_b{b}_ctx{ctx}", [1] * b, [ctx] * b)
        rows.append(time_impls(case, roof, {"jax_paged_attention": jax_paged(case)}))
    results["decode"] = rows


def section_prefill(results: dict[str, Any], roof: dict[str, float], quick: bool) -> None:
    rows = []
    for t in ([4096] if quick else [256, 1024, 2048, 4096, 8192]):
        case = make_case(f"prefill_{t}", [t], [t])
        rows.append(time_impls(case, roof, {"cudnn_dense": cudnn_dense(case)}))
    results["prefill"] = rows


def section_mixed(results: dict[str, Any], roof: dict[str, float]) -> None:
    rows = []
    for n_dec, ctx, chunk in [(64, 1024, 512), (64, 1024, 2048), (32, 4096, 1024)]:
        case = make_case(f"mixed_{n_dec}x{ctx}+{chunk}", [1] * n_dec + [chunk],
                         [ctx] * n_dec + [chunk + 512])
        rows.append(time_impls(case, roof, {}))
    results["mixed"] = rows


def section_scan(results: dict[str, Any], roof: dict[str, float],
                 case: Case | None = None) -> None:
    """Both kernels at the issue's decode point over their parameters (best vs best, not only
    each one's default), every candidate checked against the reference."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    case = case or make_case("decode_b64_ctx1024", [1] * 64, [1024] * 64)
    expect = rpa.ragged_paged_attention_reference(*case.args, sm_scale=HEAD_DIM ** -0.5)
    rows = []

    def run(kind: str, params: dict[str, Any], fn, args) -> None:
        row: dict[str, Any] = {"kernel": kind, "params": params}
        try:
            row["rel_err"] = common.relative_error(fn(*args), expect)
            row.update(record(case, common.time_in_jit(fn, *args), roof))
        except Exception as e:  # noqa: BLE001 - an invalid combination: record and go on
            row["error"] = repr(e)[:300]
        rows.append(row)
        print(f"scan {kind:5s} {params} {row.get('us', float('nan')):8.1f} us "
              f"{row.get('TB/s', float('nan')):5.2f} TB/s err {row.get('rel_err', '-')}",
              flush=True)

    for bq, ppb, sp, warps, stages in itertools.product([4], [4, 8, 16], [1, 2], [4, 8],
                                                        [2, 3, 4]):
        cfg = rpa.RaggedPagedAttentionConfig(block_q=bq, pages_per_block=ppb, num_splits=sp,
                                             num_warps=warps, num_stages=stages,
                                             key_gather=True)
        fn, args = ours(case, cfg)
        run("ours", dataclasses.asdict(cfg), fn, args)
    _, jargs = jax_paged(case)
    for k_splits, ppcb, warps in itertools.product([4, 8, 16, 32], [2, 4, 8], [4, 8]):
        params = dict(k_splits=k_splits, pages_per_compute_block=ppcb, num_warps=warps)
        fn = jax.jit(functools.partial(jpa.paged_attention, **params, interpret=INTERPRET))
        run("jax", params, fn, jargs)
    for kind in ("ours", "jax"):
        ok = [r for r in rows if r["kernel"] == kind and r.get("rel_err", 1.0) < 1e-2]
        if ok:
            best = min(ok, key=lambda r: r["us"])
            results.setdefault("scan_best", {})[kind] = best
            print(f"scan best {kind}: {best['params']} {best['us']:.1f} us {best['TB/s']:.2f} TB/s",
                  flush=True)
    results["scan"] = rows


def section_write(results: dict[str, Any]) -> None:
    """Times one step's K/V write into a 4097-page pool, both implementations donated."""
    rows = []
    num_pages = 4097
    shape = (K_HEADS, num_pages, PAGE, HEAD_DIM)
    for t in (64, 4096):
        for impl in ("xla", "pallas"):
            k_new = jax.random.normal(jax.random.key(1), (t, K_HEADS, HEAD_DIM), DTYPE)
            slots = jnp.asarray(np.random.default_rng(0).permutation(
                np.arange(PAGE, num_pages * PAGE))[:t].astype(np.int32))
            step = jax.jit(functools.partial(ops.write_kv_pages, impl=impl),
                           donate_argnums=(0, 1))
            kp = jnp.zeros(shape, DTYPE)
            vp = jnp.zeros(shape, DTYPE)
            for _ in range(3):
                kp, vp = step(kp, vp, k_new, k_new, slots)
            jax.block_until_ready(kp)
            import time
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(20):
                    kp, vp = step(kp, vp, k_new, k_new, slots)
                jax.block_until_ready(kp)
                samples.append((time.perf_counter() - start) / 20)
            ok = bool(jnp.array_equal(kp.reshape(K_HEADS, -1, HEAD_DIM)[:, slots],
                                      k_new.swapaxes(0, 1)))
            us = float(np.median(samples)) * 1e6
            rows.append({"tokens": t, "impl": impl, "us": us, "correct": ok})
            print(f"write T={t:5d} {impl:7s} {us:8.1f} us correct={ok}", flush=True)
    results["write"] = rows


def section_model(results: dict[str, Any]) -> None:
    """Greedy tokens of a small random Llama: reference vs pallas_triton attention."""
    from xlaserve.runtime.batch import StepInputs
    from xlaserve.runtime.config import ModelConfig
    from xlaserve.runtime.models import llama

    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256,
                          intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                          head_dim=64, max_position_embeddings=1024, dtype=dtype)
        params = llama.init_params(cfg, jax.random.key(0))
        prompts = [list(np.random.default_rng(1).integers(0, 512, 37)),
                   list(np.random.default_rng(2).integers(0, 512, 5))]
        tokens, logits = {}, {}
        for impl in ("reference", "pallas_triton"):
            tokens[impl], logits[impl] = _greedy(llama, StepInputs, cfg, params, prompts, impl,
                                                 steps=16)
        err = common.relative_error(logits["pallas_triton"], logits["reference"])
        top2 = np.sort(np.asarray(logits["reference"]), axis=-1)[:, -2:]
        out[dtype] = {"tokens": tokens, "same": tokens["reference"] == tokens["pallas_triton"],
                      "first_step_logits_rel_err": err,
                      "first_step_top2_gap": (top2[:, 1] - top2[:, 0]).tolist()}
        print(f"model {dtype}: same greedy tokens = {out[dtype]['same']}, first-step logits "
              f"rel err {err:.2e}", flush=True)
    results["model"] = out


def _greedy(llama, step_inputs_cls, cfg, params, prompts, impl, *,
            steps: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decode of each prompt; returns (tokens, the first step's logits [S, V])."""
    page_size, m = 16, 8
    cache = llama.init_kv_cache(cfg, 1 + len(prompts) * m, page_size)
    fwd = jax.jit(functools.partial(llama.forward, cfg=cfg, attention_impl=impl),
                  donate_argnums=(2,))
    seqs = [list(p) for p in prompts]
    table = np.array([[1 + s * m + i for i in range(m)] for s in range(len(prompts))], np.int32)
    done = [0] * len(prompts)  # tokens already in the cache
    generated: list[list[int]] = [[] for _ in prompts]
    first_logits = None
    for _ in range(steps):
        toks, pos, slots, q_lens = [], [], [], []
        for s, seq in enumerate(seqs):
            new = seq[done[s]:]
            toks += new
            pos += list(range(done[s], len(seq)))
            slots += [int(table[s, p // page_size]) * page_size + p % page_size
                      for p in range(done[s], len(seq))]
            q_lens.append(len(new))
        t_bucket = 64
        pad = t_bucket - len(toks)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        i32 = functools.partial(np.asarray, dtype=np.int32)
        inputs = step_inputs_cls(
            token_ids=i32(toks + [0] * pad), positions=i32(pos + [0] * pad),
            slot_mapping=i32(slots + [0] * pad), cu_q_lens=cu,
            kv_lens=i32([len(s) for s in seqs]), page_table=table,
            num_seqs=i32([len(seqs)]), logits_indices=i32(cu[1:] - 1))
        logits, cache = fwd(params, inputs, cache)
        if first_logits is None:
            first_logits = np.asarray(logits, np.float32)
        nxt = np.asarray(jnp.argmax(logits, axis=-1))
        for s in range(len(seqs)):
            done[s] = len(seqs[s])
            seqs[s].append(int(nxt[s]))
            generated[s].append(int(nxt[s]))
    return generated, first_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="attention_h100.json")
    parser.add_argument("--sections", default="roof,check,decode,prefill,mixed,write,model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if "all" in sections:
        sections = ["roof", "check", "decode", "prefill", "mixed", "write", "model"]
    results: dict[str, Any] = common.device_info()
    results["model_shape"] = {"N": N_HEADS, "K": K_HEADS, "H": HEAD_DIM, "L": PAGE,
                              "dtype": jnp.dtype(DTYPE).name}
    path = os.path.join(args.out, args.name)
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)

    roof: dict[str, float] = {}
    for section in sections:
        try:
            if section == "roof":
                read = common.read_bandwidth()
                roof = {"copy_bytes_per_s": common.copy_bandwidth(),
                        "read_bytes_per_s": read["read"],
                        "read_rows_bytes_per_s": read["read_rows"],
                        "read_cols_bytes_per_s": read["read_cols"],
                        "matmul_flops_per_s": common.matmul_rate()}
                results["roof"] = roof
                print(f"copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, read "
                      f"{roof['read_bytes_per_s'] / 1e12:.2f} TB/s (rows "
                      f"{read['read_rows'] / 1e12:.2f}, cols {read['read_cols'] / 1e12:.2f}), "
                      f"bf16 matmul {roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
            elif section == "check":
                section_check(results)
            elif section == "decode":
                section_decode(results, roof, args.quick)
            elif section == "prefill":
                section_prefill(results, roof, args.quick)
            elif section == "mixed":
                section_mixed(results, roof)
            elif section == "scan":
                section_scan(results, roof)
            elif section == "write":
                section_write(results)
            elif section == "model":
                section_model(results)
        except Exception:  # noqa: BLE001 - keep the other sections' numbers
            results[f"{section}_error"] = traceback.format_exc()[-3000:]
            print(results[f"{section}_error"], flush=True)
        save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
