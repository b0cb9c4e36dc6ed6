"""The derived parts of bench/tp_scaling.py's report: per-run summaries, the scaling table and
the self-checks (same weights, split params, greedy tokens, one program per shape, the 1.6x bar).

Pure functions of the per-tp results, so they also run on merged child-process reports.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from xlaserve.runtime.config import ModelConfig


def summarize(ms: list[float], per_device: dict[str, float], *, tokens: int) -> dict[str, Any]:
    med = statistics.median(ms)
    dev = list(per_device.values())
    spread = max(dev) - min(dev)
    return {"step_ms": round(med, 4), "step_ms_runs": [round(x, 4) for x in ms],
            "tokens_per_s": round(tokens / med * 1e3, 1),
            "per_device_ms": {k: round(v, 4) for k, v in per_device.items()},
            "per_device_spread_ms": round(spread, 4),
            "per_device_spread_rel": round(spread / statistics.median(dev), 4)}


def scaling(results: list[dict[str, Any]]) -> dict[str, Any]:
    base = min(results, key=lambda r: r["tp"])
    out: dict[str, Any] = {"relative_to_tp": base["tp"]}
    series = [("decode_b" + b, lambda r, b=b: r["decode"][b]["step_ms"]) for b in base["decode"]]
    if "prefill" in base:
        series.append(("prefill", lambda r: r["prefill"]["step_ms"]))
    for name, get in series:
        out[name] = {str(r["tp"]): {"step_ms": get(r),
                                    "speedup": round(get(base) / get(r), 3),
                                    "efficiency": round(get(base) * base["tp"]
                                                        / (get(r) * r["tp"]), 3)}
                     for r in results}
    return out


def checks(cfg: ModelConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    base = results[0]
    out: dict[str, Any] = {}
    for r in results:
        tp = str(r["tp"])
        n_shard = r["q_proj_shard_shape"][1]
        out[f"params_split_tp{tp}"] = n_shard == cfg.num_heads // r["tp"]
        a, b = r["param_checksums"], base["param_checksums"]
        out[f"same_weights_as_tp{base['tp']}_tp{tp}"] = (
            a["head"] == b["head"] and bool(np.allclose(a["mean_abs"], b["mean_abs"], rtol=1e-4)))
        equal = r["greedy_tokens"] == base["greedy_tokens"]
        out[f"greedy_equal_tp{tp}"] = equal
        if not equal:
            # Dummy weights give flat logits; a bf16 near-tie may flip. Record where and how
            # close: a divergence at a step whose first-tp top1 - top2 gap is under 2% of the
            # top logit (a few bf16 ulps) is a near-tie, anything wider is a bug.
            i = next(k for k, (a, b) in enumerate(zip(r["greedy_tokens"], base["greedy_tokens"]))
                     if a != b)
            gap = base["greedy_gap"][i]
            out[f"greedy_first_divergence_tp{tp}"] = {"step": i, "gap_at_first_tp": gap}
            out[f"greedy_divergence_is_near_tie_tp{tp}"] = gap < 0.02 * abs(base["greedy_top1"][i])
        n = len(r["greedy_tokens"]) if equal else i + 1  # compare logits up to the divergence
        out[f"greedy_top1_max_abs_diff_tp{tp}"] = round(max(
            abs(a - b) for a, b in zip(r["greedy_top1"][:n], base["greedy_top1"][:n])), 5)
        out[f"one_program_per_shape_tp{tp}"] = r["num_programs"] == r["expected_programs"]
    by_tp = {r["tp"]: r for r in results}
    if 1 in by_tp and 2 in by_tp and "1" in by_tp[1]["decode"]:
        speedup = by_tp[1]["decode"]["1"]["step_ms"] / by_tp[2]["decode"]["1"]["step_ms"]
        out["decode_b1_speedup_tp2"] = round(speedup, 3)
        out["meets_1p6x_decode_b1_tp2"] = speedup >= 1.6
        slopes = [by_tp[t]["decode"]["1"].get("step_ms_slope") for t in (1, 2)]
        if all(slopes):  # the steady-state steps (--slope-iters): the same bar without launches
            out["decode_b1_speedup_tp2_slope"] = round(slopes[0] / slopes[1], 3)
    return out
