#!/usr/bin/env bash
# Session 30 (issue 6): the 2-GPU kinds were withheld this session, so tp=2's per-device work is
# measured on ONE H200 through a proxy: the 8B shape with the heads, KV heads, MLP width and
# vocabulary of one tp=2 shard (16 q heads, 4 KV heads, intermediate 7168, vocab 64128) run at
# tp=1. It runs every kernel of a tp=2 device's step at the same shapes, except that the
# all-reduce + add + RMSNorm kernel is XLA's add + norm fusions (no peer) and the vocab-sharded
# lm_head's all-gather is absent (bench/results/session30_h200/README.md).
#   p: batch-1 attention's KV splits at the shard's shape (small_decode max_splits): h (the
#     default: 12 splits at 4 KV heads), h6 (6 splits, as tp=1 gets), h9 (9); h_1_t and
#     h6_1_t traced first (how many combine fusions XLA makes at 6 splits), then h/h6/h9
#     alternated at ctx 1024, then h/h6 at ctx 4096 (hl, hl6: does 6 splits lose at a longer
#     context, where each split walks 11 blocks instead of 6?). (The first call, at 169953c,
#     left head_dim out of the proxy's config, so its proxy had head_dim 256; it also ran the
#     full 8B at tp=1 with the default and 6 splits, b and b6: the same program, 4.288/4.280.)
#   q: batch-1 decode at longer contexts on one H200, where each of the default's KV splits walks
#     more blocks (tp=1: 6 splits at 8 KV heads, 11 blocks each at ctx 4096): the full 8B at
#     tp=1 at ctx 1024 (b), 2048 (bm), 4096 (bl) and 8192 (bx) with the default splits and with
#     12 / 24 (the split rule's program target raised), and the proxy at ctx 4096 with 9 and 24
#     splits (hl9, hl24). A product question (long-context batch-1 decode), and the data for a
#     split count that follows the context.
#   OUT=/tmp/out PART=p|q bash bench/run_gpu_s30.sh  (1 GPU; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 30 p || exit 1
# The proxy is `tp_scaling.py --shard-of 2` (shard_config). Calls 2-3 (commits 10ad627, 8e4e337)
# ran the same shapes from a config written here by hand (/tmp/h8b, head_dim 128 named); call 1's
# lacked head_dim.
PROXY="--shard-of 2"
args_of() { case $1 in
  h|h6|h9) echo $PROXY ;;
  hl|hl6|hl9|hl24) echo $PROXY --context 4096 ;;
  bm|bm12) echo --context 2048 ;;
  bl|bl12|bl24) echo --context 4096 ;;
  bx|bx12|bx24) echo --context 8192 ;; esac; }
# The attention table variant of a run (bench/attention_table_variant.py arguments): 6 or 9
# splits cap the small_decode section's max_splits; 12 and 24 raise the split rule's program
# target so tp=1 (8 KV heads, 64 programs before any split at batch 1) gets 12 / 24 splits.
at_args() { case $1 in
  *6) echo --small-set max_splits=6 ;;
  *9) echo --small-set max_splits=9 ;;
  *12) echo --target-programs 768 ;;
  *24) echo --target-programs 1536 --small-set max_splits=24 ;; esac; }
at_of() { local a; a=$(at_args "$1"); [ -n "$a" ] || return 0
  local f="/tmp/at_${1//[a-z]/}.json"
  [ -f "$f" ] || $PY bench/attention_table_variant.py $a --out "$f" >&2; echo "$f"; }
case $PART in
  p) run_variants "h_1_t h6_1_t h_1 h6_1 h9_1 h_1b h6_1b h9_1b h_1c h6_1c h9_1c hl_1 hl6_1 hl_1b hl6_1b" 480 ;;
  q) run_variants "b_1 bl_1 bl12_1 bl24_1 bm_1 bm12_1 bx_1 bx12_1 bx24_1 bl_1b bl12_1b bm_1b bm12_1b hl_1 hl9_1 hl24_1 bx_1b bx12_1b bl24_1b" 470 ;;
  *) echo "unknown PART=$PART"; exit 2 ;;
esac
pack_results
