"""Where does a batch-1 decode step's time go? Times variants of the same 8B-shaped step.

Variants (each one jitted program, KV cache donated, bf16 dummy weights, T=16 S=8 bucket, one
real sequence at context --context):
  full        forward + on-device sampling
  full_packed the same behind runtime/packing.py (one host->device copy: what the runner runs)
  forward     forward only (logits at logits_indices)
  no_attn     forward with attention and the K/V write replaced by identity (o = q)
  no_attn_ref same, and no sampling: only the projections, norms, rope and the LM head
  matmuls     the ideal: the same weight matrices applied to a [16, D] activation in a plain
              chain, nothing else (the floor XLA can reach for these weights)
Differences between variants place the time: sampling, attention + K/V write, the rest.

  python bench/decode_breakdown.py --config bench/configs/llama3.1-8b --out $OUT/breakdown.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys
import time

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import jax.numpy as jnp
import numpy as np

import trace_summary  # bench/


def _median_ms(fn, args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _pipelined_ms(call, repeats: int) -> float:
    """ms per step dispatched back to back with one wait at the end (as the engine overlaps)."""
    jax.block_until_ready(call())
    t0 = time.perf_counter()
    outs = [call() for _ in range(repeats)]
    jax.block_until_ready(outs)
    return 1e3 * (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="bench/configs/llama3.1-8b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--num-pages", type=int, default=4096)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=1,
                   help="real decode sequences, each at --context (bucket S >= 8, T >= 16)")
    p.add_argument("--variants", default="full,forward,no_attn,no_attn_ref,matmuls",
                   help="comma-separated subset of the variants to time")
    p.add_argument("--trace-dir", default=None,
                   help="also trace --trace-steps steps of the first variant with "
                        "jax.profiler and summarise the device kernels (trace_summary.py)")
    p.add_argument("--trace-steps", type=int, default=5)
    p.add_argument("--trace-variant", default=None, help="default: the first one timed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    wanted = [v for v in args.variants.split(",") if v]

    from xlaserve.checkpoints.loader import load_model
    from xlaserve.runtime import packing, sampling
    from xlaserve.runtime.batch import StepInputs
    from xlaserve.runtime.model_runner import greedy_sampling_inputs
    from xlaserve.runtime.models import llama

    t0 = time.perf_counter()
    loaded = load_model(args.config, load_format="dummy", dtype="bfloat16")
    cfg, params = loaded.config, loaded.params
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    print(f"dummy weights ready in {load_s:.1f} s", flush=True)
    b, ps, ctx = args.batch, args.page_size, args.context
    s = max(8, 1 << (b - 1).bit_length())
    t = max(16, s)
    max_pages = (ctx + ps) // ps + 1
    if 1 + b * max_pages > args.num_pages:
        raise SystemExit(f"--num-pages {args.num_pages} < {1 + b * max_pages} needed")
    page_table = np.zeros((s, max_pages), np.int32)
    for i in range(b):  # sequence i owns pages 1 + i*max_pages ...
        page_table[i] = 1 + i * max_pages + np.arange(max_pages)
    pos = np.zeros(t, np.int32)
    pos[:b] = ctx - 1
    slots = np.zeros(t, np.int32)
    slots[:b] = page_table[np.arange(b), (ctx - 1) // ps] * ps + (ctx - 1) % ps
    kv_lens = np.zeros(s, np.int32)
    kv_lens[:b] = ctx
    inputs = StepInputs(
        token_ids=np.full(t, 7, np.int32), positions=pos, slot_mapping=slots,
        cu_q_lens=np.r_[0, np.minimum(np.arange(1, s + 1), b)].astype(np.int32),
        kv_lens=kv_lens, page_table=page_table,
        num_seqs=np.full(1, b, np.int32), logits_indices=np.r_[np.arange(b), np.zeros(s - b)]
        .astype(np.int32), sampling=greedy_sampling_inputs(s))
    kv = llama.init_kv_cache(cfg, args.num_pages, ps)

    def identity_attention(q, k_new, v_new, k_pages, v_pages, inputs, *, sm_scale,
                           sliding_window):
        del k_new, v_new, inputs, sm_scale, sliding_window
        return q, k_pages, v_pages

    def full(params, kv, inputs):
        logits, kv = llama.forward(params, inputs, kv, cfg)
        return sampling.sample(logits, inputs.sampling).token_ids, kv

    def forward(params, kv, inputs):
        return llama.forward(params, inputs, kv, cfg)

    def no_attn(params, kv, inputs):
        logits, kv = llama.forward(params, inputs, kv, cfg, attention_fn=identity_attention)
        return sampling.sample(logits, inputs.sampling).token_ids, kv

    def no_attn_ref(params, kv, inputs):
        return llama.forward(params, inputs, kv, cfg, attention_fn=identity_attention)

    # Every weight matrix as 2-D [in, out] (o_proj [N, H, D] -> [N*H, D]); the embedding table
    # is only gathered from in a step, so it is left out (the LM head is read in full).
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mats = []
    for path, w in flat:
        name = jax.tree_util.keystr(path)
        if w.ndim < 2 or "embed" in name:
            continue
        split = 2 if "o_proj" in name else 1  # contraction dims lead the kernel
        mats.append(w.reshape(int(np.prod(w.shape[:split])), -1))

    def matmuls(mats, kv, inputs):
        del inputs
        acc = jnp.zeros((), jnp.float32)
        for w in mats:
            x = jnp.ones((t, w.shape[0]), w.dtype)
            acc = acc + jnp.dot(x, w, preferred_element_type=jnp.float32)[0, 0]
        return acc, kv

    spec = packing.spec_of(inputs)
    packed_inputs = packing.pack(inputs, spec)

    def full_packed(params, kv, packed_inputs):  # what the ModelRunner runs: one H2D copy
        return full(params, kv, packing.unpack(*packed_inputs, spec))

    variants = {"full": full, "full_packed": full_packed, "forward": forward,
                "no_attn": no_attn, "no_attn_ref": no_attn_ref}

    # forward with explicit attention kernel tiles: "attn_ppb{P}_sp{S}_w{W}_st{N}" variants
    # (for tuning the decode entry; the model otherwise takes the tuning table's choice).
    from xlaserve.pallas_kernels import ops
    from xlaserve.pallas_kernels import ragged_paged_attention as rpa

    def attn_with(config):
        def fn(q, k_new, v_new, k_pages, v_pages, inputs, *, sm_scale, sliding_window):
            k_pages, v_pages = ops.write_kv_pages(k_pages, v_pages, k_new, v_new,
                                                  inputs.slot_mapping)
            o = rpa.ragged_paged_attention(
                q, k_pages, v_pages, inputs.kv_lens, inputs.page_table, inputs.cu_q_lens,
                inputs.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                config=config, interpret=jax.default_backend() == "cpu")
            return o, k_pages, v_pages
        return fn

    for name in wanted:
        if name.startswith("attn_"):
            f = {k: int(v) for k, v in re.findall(r"(ppb|sp|w|st)(\d+)", name)}
            gp = 1 << max(0, (cfg.num_heads // cfg.num_kv_heads - 1).bit_length())
            config = rpa.RaggedPagedAttentionConfig(
                block_q=max(1, 16 // gp), pages_per_block=f["ppb"], num_splits=f["sp"],
                num_warps=f.get("w", 4), num_stages=f.get("st", 2))

            attention = attn_with(config)

            def attn_variant(params, kv, inputs, fn=attention):
                return llama.forward(params, inputs, kv, cfg, attention_fn=fn)
            variants[name] = attn_variant

    # gate and up as one [D, 2I] matrix: what fusing the two projections would save
    def matmuls_gate_up(mats2, kv, inputs):
        return matmuls(mats2, kv, inputs)
    results = {}
    traced = None
    jax.block_until_ready(params)
    for name, fn in variants.items():
        if name not in wanted:
            continue
        jitted = jax.jit(fn, donate_argnums=(1,))
        state = {"kv": kv}

        step_args = packed_inputs if name == "full_packed" else inputs

        def call(jitted=jitted, state=state, step_args=step_args):
            out, state["kv"] = jitted(params, state["kv"], step_args)
            return out
        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        results[name] = {"ms": _median_ms(lambda: call(), (), args.repeats),
                         "ms_pipelined": _pipelined_ms(call, args.repeats),
                         "first_call_s": round(compile_s, 2)}
        if args.trace_dir and traced is None and args.trace_variant in (None, name):
            traced = name
            results[name]["trace"] = trace_summary.trace_calls(call, args.trace_dir,
                                                                  args.trace_steps)
        kv = state["kv"]
        print(name, {k: v for k, v in results[name].items() if k != "trace"}, flush=True)
    if "matmuls" in wanted:
        jm = jax.jit(matmuls)
        results["matmuls"] = {"ms": _median_ms(lambda: jm(mats, None, None), (), args.repeats)}
        print("matmuls", results["matmuls"], flush=True)
    if "matmuls_gate_up" in wanted:
        merged, i = [], 0
        names = [jax.tree_util.keystr(p) for p, w in flat if w.ndim >= 2 and
                 "embed" not in jax.tree_util.keystr(p)]
        while i < len(mats):
            if "gate_proj" in names[i] and i + 1 < len(mats) and "up_proj" in names[i + 1]:
                merged.append(jnp.concatenate([mats[i], mats[i + 1]], axis=1))
                i += 2
            else:
                merged.append(mats[i])
                i += 1
        jm = jax.jit(matmuls_gate_up)
        results["matmuls_gate_up"] = {
            "ms": _median_ms(lambda: jm(merged, None, None), (), args.repeats),
            "matrices": len(merged)}
        print("matmuls_gate_up", results["matmuls_gate_up"], flush=True)
        del merged
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    report = {
        "bench": "decode_breakdown", "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "context": ctx, "weight_bytes": weight_bytes,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "batch": b, "bucket": [t, s],
        "num_pages": args.num_pages, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_s": round(load_s, 2), "variants_ms": results,
    }
    ms = {k: v["ms"] for k, v in results.items()}
    if "full" in ms and "no_attn" in ms:
        report["attention_and_write_ms"] = ms["full"] - ms["no_attn"]
    if "full" in ms and "forward" in ms:
        report["sampling_ms"] = ms["full"] - ms["forward"]
    print(json.dumps({k: v for k, v in report.items() if k != "variants_ms"}), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
