"""Offline throughput through `LLM.generate`: requests/s, output tokens/s and total tokens/s for
fixed input/output lengths and a ShareGPT-like length mix, each beside its roofline.

Every request is a random token-id prompt (fixed seed), greedy, ignore_eos, max_tokens = output
length, so lengths are exact (checked). All requests of a case go to one `generate` call; the
clock covers that call only. Before the timed call, a short untimed generate of the same shapes
touches every program once.

Cases: "IN/OUT" (e.g. 128/128) or "sharegpt" (lognormal input and output lengths from a fixed
seed, clipped to [4, 1024] and [4, 1024]: a synthetic stand-in for the ShareGPT mix, no
download), optionally ":N" for the request count (e.g. 2048/128:256).

Roofline for a case, at concurrency B = min(max_num_seqs, sequences that fit in the KV pages):
compute = total FLOPs / matmul rate; memory = (ceil(N/B) * OUT decode steps reading every weight
+ all KV reads and writes) / copy bandwidth; roofline = max of the two. It is a bound for this
engine configuration, not for the hardware at any batch size.

  python bench/throughput.py --out $OUT/throughput.json                  # 128/128, 2048/128
  python bench/throughput.py --cases 128/2048 1000/1000 2048/2048 sharegpt --out ...
  python bench/throughput.py --model builtin:tiny --cases 16/8:8 --max-num-seqs 8 \
      --max-num-batched-tokens 64 --token-buckets 64 --seq-buckets 8     # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np

import e2e_common as ec

DEFAULT_CASES = ("128/128", "2048/128")
ALL_CASES = ("128/128", "128/2048", "1000/1000", "2048/128", "2048/2048", "sharegpt")
TARGETS = {"128/128": 12_000.0, "2048/128": 1_600.0}  # output tokens/s, one H100, 8B bf16


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload: its name and exact (input, output) length of every request."""

    name: str
    lengths: tuple[tuple[int, int], ...]


def parse_case(text: str, default_n: int, seed: int) -> Case:
    """'IN/OUT', 'IN/OUT:N', 'sharegpt' or 'sharegpt:N'."""
    spec, _, n_text = text.partition(":")
    n = int(n_text) if n_text else default_n
    if n < 1:
        raise ValueError(f"--cases {text!r}: the request count must be >= 1")
    if spec == "sharegpt":
        return Case(spec, ec.sharegpt_lengths(n, seed))
    try:
        i, o = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise ValueError(f"--cases {text!r}: expected IN/OUT[:N] or sharegpt[:N]") from e
    if i < 1 or o < 1:
        raise ValueError(f"--cases {text!r}: lengths must be >= 1")
    return Case(spec, ((i, o),) * n)


def case_roofline(cost: ec.ModelCost, lengths: tuple[tuple[int, int], ...], concurrency: int,
                  ceilings: dict[str, Any]) -> dict[str, Any] | None:
    """Compute and memory bounds of a whole case at `concurrency` live sequences."""
    flops = 0.0
    kv_bytes = 0.0
    for i, o in lengths:
        f, _ = cost.step_cost([i], [i])  # the prompt (one logits row)
        flops += f
        # O-1 decode steps at contexts i+1 .. i+o-1: weights counted per step below.
        ctx_sum = (o - 1) * i + (o - 1) * o / 2
        flops += (o - 1) * 2.0 * (cost.layer_matmul_params + cost.lm_head_params)
        flops += cost.attn_flops_per_query_key * ctx_sum
        kv_bytes += (ctx_sum + (i + o)) * cost.kv_bytes_per_token
    n = len(lengths)
    steps = math.ceil(n / concurrency) * max(o for _, o in lengths)
    if len({o for _, o in lengths}) > 1:  # mixed lengths: output tokens / concurrency
        steps = math.ceil(sum(o for _, o in lengths) / concurrency)
    num_bytes = steps * cost.step_weight_bytes + kv_bytes
    roof = ec.roofline(flops, num_bytes, ceilings)
    if roof is None:
        return None
    out_tokens = sum(o for _, o in lengths)
    roof.update(concurrency=concurrency, decode_steps_min=steps,
                output_tokens_per_s=out_tokens / roof["seconds"])
    return roof


def run_case(built: ec.BuiltEngine, llm: Any, case: Case, rng: np.random.Generator,
             warm_n: int, ceilings: dict[str, Any], cost: ec.ModelCost) -> dict[str, Any]:
    """Warms the case's shapes, then times one LLM.generate over all its requests."""
    from xlaserve.runtime.request import SamplingParams

    vocab = built.model_config.vocab_size
    warm = case.lengths[:warm_n]
    built.set_recording(False)
    llm.generate([ec.random_prompt(rng, i, vocab) for i, _ in warm],
                 [SamplingParams(max_tokens=min(o, 4), temperature=0.0, ignore_eos=True)
                  for _, o in warm])
    built.set_recording(True)
    built.reset_records()
    prompts = [ec.random_prompt(rng, i, vocab) for i, _ in case.lengths]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
              for _, o in case.lengths]
    stats0 = built.engine.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    stats1 = built.engine.stats()
    for out, (_, o) in zip(outs, case.lengths):
        if len(out.token_ids) != o:
            raise RuntimeError(f"case {case.name}: {out.request_id} produced "
                               f"{len(out.token_ids)} tokens, expected exactly {o}")
    n = len(case.lengths)
    in_tok = sum(i for i, _ in case.lengths)
    out_tok = sum(o for _, o in case.lengths)
    e = built.engine
    replicas = len(built.timed_replicas) or 1  # data parallel: each on its own GPU
    per_seq_pages = max(math.ceil((i + o) / e.runner.page_size) for i, o in case.lengths)
    concurrency = max(1, min(e.config.scheduler.max_num_seqs,
                             (stats1.num_pages_total // replicas) // per_seq_pages))
    # One replica's roofline over its share of the requests (an even split), D at once.
    share = case.lengths[:math.ceil(n / replicas)]
    roof = case_roofline(cost, share, concurrency, ceilings)
    if roof is not None and replicas > 1:
        roof = {**roof, "replicas": replicas, "output_tokens_per_s": out_tok / roof["seconds"]}
    out_tps = out_tok / elapsed
    res = {
        "case": case.name, "num_requests": n, "input_tokens": in_tok, "output_tokens": out_tok,
        "mean_input_len": in_tok / n, "mean_output_len": out_tok / n,
        "elapsed_s": elapsed, "requests_per_s": n / elapsed, "output_tokens_per_s": out_tps,
        "total_tokens_per_s": (in_tok + out_tok) / elapsed,
        "roofline_output_tokens_per_s": roof["output_tokens_per_s"] if roof else None,
        "fraction_of_roofline": out_tps / roof["output_tokens_per_s"] if roof else None,
        "roofline": roof,
        "num_steps": stats1.num_steps - stats0.num_steps,
        "preemptions": stats1.num_preemptions - stats0.num_preemptions,
        "prefix_cache_hit_tokens": stats1.prefix_cache_hits - stats0.prefix_cache_hits,
        "host_gaps": built.timed.idle_summary(),
        "host_gaps_per_replica": ([t.idle_summary() for t in built.timed_replicas]
                                  if replicas > 1 else None),
        "compiles_after_warmup_so_far": stats1.compiles_after_warmup,
    }
    if case.name in TARGETS:
        res["target_output_tokens_per_s"] = TARGETS[case.name]
        res["target_met"] = out_tps >= TARGETS[case.name]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ec.add_engine_flags(p, max_num_seqs=256, max_num_batched_tokens=2048)
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                   help=f"IN/OUT[:N] or sharegpt[:N]; all: {' '.join(ALL_CASES)}")
    p.add_argument("--num-prompts", type=int, default=512, help="requests per case without :N")
    p.add_argument("--warmup-prompts", type=int, default=16,
                   help="untimed requests (max 4 output tokens) before each case")
    p.add_argument("--all-buckets", action="store_true",
                   help="the runner's power-of-two buckets instead of the small default set")
    args = p.parse_args(argv)
    if not args.all_buckets:
        if args.token_buckets is None:  # decode rows + a little prefill land in 256/512 steps
            b = args.max_num_batched_tokens
            args.token_buckets = tuple(x for x in (256, 512, 1024) if x < b) + (b,)
        if args.seq_buckets is None:
            args.seq_buckets = (args.max_num_seqs,)
    cases = [parse_case(c, args.num_prompts, args.seed) for c in args.cases]
    max_len = max(i + o for c in cases for i, o in c.lengths)
    max_len = math.ceil(max_len / args.page_size) * args.page_size

    report, built, cost = ec.start_report("throughput", args, max_model_len=max_len)
    rng = np.random.default_rng(args.seed)
    from xlaserve.runtime.llm import LLM

    llm = LLM(engine=built.engine)  # one LLM: request ids stay unique across cases
    results = []
    for case in cases:
        res = run_case(built, llm, case, rng, args.warmup_prompts, report["ceilings"], cost)
        results.append(res)
        print(f"{case.name:>10}: {res['requests_per_s']:.2f} req/s, "
              f"{res['output_tokens_per_s']:.0f} out tok/s, {res['total_tokens_per_s']:.0f} "
              f"total tok/s (roofline {ec.fmt(res['roofline_output_tokens_per_s'], 0)} out tok/s)",
              flush=True)
        if args.out:  # after every case: a run cut short keeps what it measured
            ec.write_json(args.out, {**report, "cases": results, "partial": True})
    report["cases"] = results
    rc = ec.finish_report(report, built, args.out)
    _print_table(report)
    return rc


def _print_table(report: dict[str, Any]) -> None:
    print(f"{'case':>10} {'N':>5} {'req/s':>8} {'out tok/s':>10} {'total tok/s':>11} "
          f"{'roofline':>9} {'frac':>5} {'idle':>5} {'target':>8}")
    for c in report["cases"]:
        idle = c["host_gaps"].get("idle_fraction_lower_bound")
        tgt = c.get("target_output_tokens_per_s")
        met = "" if tgt is None else ("MET" if c["target_met"] else "NOT MET")
        print(f"{c['case']:>10} {c['num_requests']:>5} {c['requests_per_s']:>8.2f} "
              f"{c['output_tokens_per_s']:>10.0f} {c['total_tokens_per_s']:>11.0f} "
              f"{ec.fmt(c['roofline_output_tokens_per_s'], 0):>9} "
              f"{ec.fmt(c['fraction_of_roofline']):>5} {ec.fmt(idle):>5} {met:>8}")


if __name__ == "__main__":
    sys.exit(main())
