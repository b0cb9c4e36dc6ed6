"""Writes an A/B variant of the attention tile table (pallas_kernels/tuning_h100.json) for
XLASERVE_ATTENTION_TABLE: the split rule's min_blocks_per_split / target_programs, and the
fields of one entry (default: the 8B decode entry, H128_L16_G4_decode), with or without the
small_decode section.

  python bench/attention_table_variant.py --min-blocks 1 --out /tmp/attn_mb1.json
  python bench/attention_table_variant.py --set num_stages=2 --out /tmp/attn_st2.json
  python bench/attention_table_variant.py --set q_transposed=true --out /tmp/attn_qt.json
  python bench/attention_table_variant.py --small-set max_splits=17 --out /tmp/attn_sp17.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

TABLE = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels" / "tuning_h100.json"
OPTIONAL = ("key_gather", "q_transposed")  # entry fields tuning.py defaults when absent


def variant(table: dict, *, min_blocks: int | None = None, target_programs: int | None = None,
            entry: str = "H128_L16_G4_decode", sets: Sequence[str] = (),
            small_decode: bool = True, small_sets: Sequence[str] = ()) -> dict:
    out = json.loads(json.dumps(table))
    if not small_decode:
        out.pop("small_decode", None)
    if min_blocks is not None:
        out["split"]["min_blocks_per_split"] = min_blocks
    if target_programs is not None:
        out["split"]["target_programs"] = target_programs
    for s in sets:
        key, _, value = s.partition("=")
        if key not in out["entries"][entry] and key not in OPTIONAL:
            raise ValueError(f"--set {s}: {entry} has no field {key!r}")
        out["entries"][entry][key] = json.loads(value)
    for s in small_sets:
        key, _, value = s.partition("=")
        if key not in out.get("small_decode", {}):
            raise ValueError(f"--small-set {s}: the small_decode section has no field {key!r}")
        out["small_decode"][key] = json.loads(value)
    out["comment"] = f"A/B variant of {TABLE.name}: min_blocks={min_blocks} " \
                     f"target_programs={target_programs} {entry} {list(sets)} " \
                     f"small_decode={small_decode} {list(small_sets)}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-blocks", type=int, default=None)
    p.add_argument("--target-programs", type=int, default=None)
    p.add_argument("--entry", default="H128_L16_G4_decode")
    p.add_argument("--set", action="append", default=[], help="FIELD=JSON of the entry")
    p.add_argument("--small-set", action="append", default=[],
                   help="FIELD=JSON of the small_decode section (e.g. max_splits=17)")
    p.add_argument("--no-small-decode", action="store_true",
                   help="drop the table's small_decode section (the tiles before session 22)")
    p.add_argument("--out", type=pathlib.Path, required=True)
    args = p.parse_args(argv)
    table = json.loads(TABLE.read_text())
    args.out.write_text(json.dumps(variant(table, min_blocks=args.min_blocks,
                                           target_programs=args.target_programs,
                                           entry=args.entry, sets=args.set,
                                           small_decode=not args.no_small_decode,
                                           small_sets=args.small_set), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
