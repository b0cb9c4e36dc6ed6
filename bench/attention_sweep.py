"""Tuning sweep for the Pallas ragged paged attention kernel; writes the tuning table.

For each table key (head dim H, page size L, GQA group G, q-length class) it times candidate
(block_q, pages_per_block, num_warps, num_stages, key_gather) on one representative batch, keeps
the fastest correct one, and sweeps KV splits for long-context decode to set the split rule.
Output: a table in the format of pallas_kernels/tuning_h100.json (``--table``) and the raw
timings (``--out``).

    PYTHONUNBUFFERED=1 python bench/attention_sweep.py --table pallas_kernels/tuning_h100.json \
        --out bench/results/attention_sweep_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from typing import Any

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import numpy as np

import attention as bench
import common
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.tuning import table_key

Cfg = rpa.RaggedPagedAttentionConfig


def representative(q_class: str, *, head_dim: int, page_size: int, group: int) -> bench.Case:
    """The batch a key is tuned on (K = 8 KV heads, N = 8 G)."""
    shape = dict(n_heads=8 * group, k_heads=8, head_dim=head_dim, page_size=page_size)
    if q_class == "decode":
        return bench.make_case("decode_b64_ctx1024", [1] * 64, [1024] * 64, **shape)
    if q_class == "mixed":
        return bench.make_case("mixed_64x1024+2048", [1] * 64 + [2048], [1024] * 64 + [2560],
                               **shape)
    return bench.make_case("prefill_4096", [4096], [4096], **shape)


def check_case(q_class: str, *, head_dim: int, page_size: int, group: int) -> bench.Case:
    """A small batch of the same class, to check a config where the reference of the
    representative batch does not fit in memory (prefill 4096 would gather ~200 GB)."""
    shape = dict(n_heads=8 * group, k_heads=8, head_dim=head_dim, page_size=page_size)
    if q_class == "mixed":
        return bench.make_case("check_mixed_8x256+200", [1] * 8 + [200], [256] * 8 + [300],
                               **shape)
    return bench.make_case("check_prefill_200", [200], [200], **shape)


def candidates(q_class: str, group: int, full: bool) -> list[Cfg]:
    """First-pass candidates, with key gather and the q layout that wins the class (decode reads
    q directly; prefill and mixed from the transposed copy: session 3's A/B found the direct
    read 25-35% slower there, and ranking prefill tiles by it picked the wrong ones, session 6).
    The best are re-timed with the other q layout and with the per-page gather."""
    gp = rpa.padded_group(group)
    min_bq = max(1, 16 // gp)
    if q_class == "decode":
        grid = itertools.product([min_bq], [2, 4, 8], [4, 8], [2, 3] if full else [2])
    elif q_class == "mixed":
        grid = itertools.product(sorted({max(min_bq, b) for b in (8, 16, 32)}), [2, 4], [4, 8],
                                 [2] if full else [2])
    else:
        bqs = [b for b in (2, 4, 8, 16, 32, 64) if 32 <= b * gp <= 256] or [min_bq]
        grid = itertools.product(bqs, [2, 4, 8], [4, 8], [2, 3] if full else [2])
    out = []
    for bq, ppb, warps, stages in grid:
        if q_class != "decode" and bq * gp * ppb > 256 * 4:
            continue  # rows x pages too big a tile for the register file
        out.append(Cfg(block_q=bq, pages_per_block=ppb, num_warps=warps, num_stages=stages,
                       key_gather=True, q_transposed=q_class != "decode"))
    return out


def time_config(case: bench.Case, cfg: Cfg, check: tuple[bench.Case, jax.Array] | None,
                ) -> dict[str, Any]:
    """Checks cfg on `check` (a case and its reference output), then times it on `case`."""
    row: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
    try:
        if check is not None:
            fn, args = bench.ours(check[0], cfg)
            row["rel_err"] = common.relative_error(fn(*args), check[1])
            row["checked_on"] = check[0].name
            if not row["rel_err"] < 1e-2:
                row["error"] = f"rel_err {row['rel_err']}"
                return row
        fn, args = bench.ours(case, cfg)
        # Device time of 5 dependent calls in one program. Until session 5 the sweep timed
        # back-to-back dispatch, ~10% noisy; it ranked prefill tiles wrongly (NOTES_attention.md).
        row["us"] = common.time_in_jit(fn, *args, n=5, repeats=3) * 1e6
    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped, reported
        row["error"] = repr(e)[:400]
    return row


def sweep_key(q_class: str, *, head_dim: int, page_size: int, group: int, full: bool,
              raw: list[dict[str, Any]]) -> dict[str, Any] | None:
    case = representative(q_class, head_dim=head_dim, page_size=page_size, group=group)
    small = case if bench.reference_fits(case) else check_case(
        q_class, head_dim=head_dim, page_size=page_size, group=group)
    check = (small, rpa.ragged_paged_attention_reference(*small.args, sm_scale=head_dim ** -0.5))
    best = None
    start = time.time()
    rows = []
    for cfg in candidates(q_class, group, full):
        row = time_config(case, cfg, check)
        row.update(key=table_key(head_dim, page_size, group, q_class), case=case.name)
        raw.append(row)
        rows.append(row)
    top = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])[:3 if full else 2]
    variants = [dict(q_transposed=q_class == "decode")] * len(top) + [dict(key_gather=False)]
    for r, change in zip(top + top[:1], variants):  # second pass: other q layout; page gather
        cfg = dataclasses.replace(Cfg(**r["config"]), **change)
        row = time_config(case, cfg, check)
        row.update(key=table_key(head_dim, page_size, group, q_class), case=case.name)
        raw.append(row)
        rows.append(row)
    for row in rows:
        if "us" in row and (best is None or row["us"] < best["us"]):
            best = row
    key = table_key(head_dim, page_size, group, q_class)
    if best is None:
        print(f"{key}: no candidate ran", flush=True)
        return None
    print(f"{key}: best {best['us']:.1f} us {best['config']} ({time.time() - start:.0f} s)",
          flush=True)
    entry = {k: best["config"][k] for k in ("block_q", "pages_per_block", "num_warps",
                                             "num_stages", "key_gather", "q_transposed")}
    entry["us"] = round(best["us"], 2)
    entry["case"] = case.name
    info = common.device_info()
    entry.update(device=info["device"], jax=info["jax"], command=info["command"])
    return entry


def sweep_splits(entry: dict[str, Any], raw: list[dict[str, Any]]) -> dict[str, int]:
    """Splits for long decode: best split count per (batch, context) -> the split rule."""
    best_programs = []
    for b, ctx in [(1, 32768), (1, 8192), (8, 32768), (64, 1024)]:
        case = bench.make_case(f"decode_b{b}_ctx{ctx}", [1] * b, [ctx] * b)
        timings = {}
        for splits in [1, 4, 16, 32, 64, 128]:
            cfg = Cfg(block_q=entry["block_q"], pages_per_block=entry["pages_per_block"],
                      num_warps=entry["num_warps"], num_stages=entry["num_stages"],
                      key_gather=entry["key_gather"], q_transposed=entry["q_transposed"],
                      num_splits=splits)
            row = time_config(case, cfg, None)
            row.update(key="splits", case=case.name)
            raw.append(row)
            if "us" in row:
                timings[splits] = row["us"]
        if timings:
            s_best = min(timings, key=timings.get)
            print(f"splits {case.name}: {timings} -> {s_best}", flush=True)
            best_programs.append(s_best * b * 8)
    target = int(np.median(best_programs)) if best_programs else 264
    return {"target_programs": max(target, 8), "min_blocks_per_split": 4, "max_splits": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", default="pallas_kernels/tuning_h100.json")
    parser.add_argument("--out", default="bench/results/attention_sweep_h100.json")
    parser.add_argument("--extra", action="store_true",
                        help="also tune G 1/8/16, H 64 (G 4/8), L 32/64 (smaller candidate sets)")
    parser.add_argument("--only", default="",
                        help="comma-separated table keys to sweep (e.g. H128_L16_G8_decode); "
                             "the others keep their table entries")
    parser.add_argument("--no-splits", action="store_true", help="keep the table's split rule")
    args = parser.parse_args()
    raw: list[dict[str, Any]] = []
    with open(args.table) as f:
        table = json.load(f)
    entries: dict[str, Any] = dict(table.get("entries", {}))
    keys = [(128, 16, 4, c, True) for c in ("decode", "prefill", "mixed")]
    if args.extra:
        # G 16: one-KV-head models and 16 q heads per KV head; H64 G8: Qwen2.5-0.5B (14/2).
        keys += [(h, l, g, c, False) for (h, l, g) in [(128, 16, 1), (128, 16, 8), (64, 16, 4),
                                                       (128, 32, 4), (128, 64, 4),
                                                       (128, 16, 16), (64, 16, 8)]
                 for c in ("decode", "prefill", "mixed")]
    if args.only:
        only = set(args.only.split(","))
        keys = [k for k in keys if table_key(k[0], k[1], k[2], k[3]) in only]
        missing = only - {table_key(k[0], k[1], k[2], k[3]) for k in keys}
        if missing:
            parser.error(f"--only {sorted(missing)}: not among the sweep's keys "
                         f"(add --extra for the G 1/8/16, H 64, L 32/64 keys)")
    for head_dim, page_size, group, q_class, full in keys:
        entry = sweep_key(q_class, head_dim=head_dim, page_size=page_size, group=group,
                          full=full, raw=raw)
        if entry is not None:
            entries[table_key(head_dim, page_size, group, q_class)] = entry
            if (head_dim, page_size, group) == (128, 16, 4):
                table["default"][q_class] = {k: entry[k] for k in (
                    "block_q", "pages_per_block", "num_warps", "num_stages", "key_gather",
                    "q_transposed")}
        table["entries"] = entries
        with open(args.table, "w") as f:
            json.dump(table, f, indent=1)
        with open(args.out, "w") as f:
            json.dump({"table": table, "raw": raw}, f, indent=1)
    decode = entries.get(table_key(128, 16, 4, "decode"))
    if decode is not None and not args.no_splits:
        table["split"] = sweep_splits(decode, raw)
    info = common.device_info()
    # device/jax/command at the top name the last sweep; each entry names its own.
    table.update(device=info["device"], jax=info["jax"], command=info["command"],
                 comment="Written by bench/attention_sweep.py on the GPU; do not edit by hand.")
    with open(args.table, "w") as f:
        json.dump(table, f, indent=1)
    with open(args.out, "w") as f:
        json.dump({**info, "table": table, "raw": raw}, f, indent=1)
    print(f"wrote {args.table} and {args.out}")


if __name__ == "__main__":
    main()
