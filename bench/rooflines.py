"""Rooflines of the end-to-end benchmarks: the ceilings measured on this device now, and the
bytes and FLOPs of a Llama-family decoder step (latency.py, throughput.py; through e2e_common).

  * `measure_ceilings`: copy bandwidth and bf16 matmul rate measured in the same process
    (bench/common.py helpers).
  * `ModelCost`: bytes and FLOPs of a Llama-family decoder for rooflines.
  * `roofline`: max(bytes / bandwidth, FLOPs / matmul rate) with both parts.

bench/ is not a package: imported as `rooflines` (the scripts' directory is first on sys.path).
Never imported by package code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


# ---------------------------------------------------------------------------------------- ceilings


def measure_ceilings(skip: bool = False) -> dict[str, Any]:
    """Copy bandwidth (read + write bytes) and bf16 matmul rate measured on this device now.

    GPU: a 2 GiB elementwise copy and 8192^3 bf16 matmuls; CPU: 64 MiB and 512^3 (smoke runs).
    """
    import common  # bench/common.py (same directory as the scripts)
    import jax

    from xlaserve.runtime import hardware

    if skip:
        return {"measured": False}
    on_cpu = jax.devices()[0].platform == "cpu"
    copy_bytes = (64 << 20) if on_cpu else (2 << 30)
    dim = 512 if on_cpu else 8192
    out: dict[str, Any] = {
        "measured": True, "copy_bytes_per_s": float(common.copy_bandwidth(copy_bytes)),
        "matmul_bf16_flops_per_s": float(common.matmul_rate(dim)), "copy_bytes": copy_bytes,
        "matmul_dim": dim,
        "how": "bench/common.py copy_bandwidth (x+1 over bf16) / matmul_rate (bf16, f32 acc)"}
    try:
        peaks = hardware.peaks_for_device(jax.devices()[0])
    except ValueError:  # no datasheet entry for this device kind (e.g. CPU)
        return out
    out["datasheet"] = {"name": peaks.name, "memory_bytes_per_s": peaks.memory_bytes_per_s,
                        "bf16_flops_per_s": peaks.bf16_flops_per_s}
    return out


# ---------------------------------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one Llama-family decoder, from its config (no arrays).

    Matmul FLOPs count 2 per multiply-add. Logits are computed for one row per sequence only
    (the runner samples `logits_indices`), so the vocab projection costs 2*D*V per sequence, not
    per token. Decode reads every weight except the embedding table (only the looked-up rows).
    """

    layer_matmul_params: int  # per token, all layers: q, k, v, o, gate, up, down
    lm_head_params: int  # D * V
    embed_params: int  # V * D (a separate table unless tied)
    other_params: int  # norms, biases
    itemsize: int
    kv_bytes_per_token: int  # K and V, all layers
    attn_flops_per_query_key: int  # 4 * N * H * layers: QK^T and PV for one (query, key) pair

    @classmethod
    def from_config(cls, cfg: Any) -> ModelCost:
        d, f, n, k, h, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
        other = L * 2 * d + d + (L * (n + 2 * k) * h if cfg.attention_bias else 0) + (
            L * 2 * h if cfg.qk_norm else 0)
        itemsize = 4 if cfg.dtype == "float32" else 2
        return cls(layer_matmul_params=L * per_layer, lm_head_params=d * cfg.vocab_size,
                   embed_params=0 if cfg.tie_word_embeddings else cfg.vocab_size * d,
                   other_params=other, itemsize=itemsize,
                   kv_bytes_per_token=cfg.kv_bytes_per_token,
                   attn_flops_per_query_key=4 * n * h * L)

    @property
    def total_params(self) -> int:
        return self.layer_matmul_params + self.lm_head_params + self.embed_params + \
            self.other_params

    @property
    def step_weight_bytes(self) -> int:
        """Weights one step must read (the embedding table only by rows: not counted)."""
        return (self.layer_matmul_params + self.lm_head_params + self.other_params) * \
            self.itemsize

    def step_cost(self, q_lens: Sequence[int], kv_lens: Sequence[int]) -> tuple[float, float]:
        """(FLOPs, minimum bytes) of one step with these sequences.

        Args:
          q_lens: new tokens per sequence this step.
          kv_lens: tokens in the cache per sequence after the step (new ones included).
        """
        tokens = sum(q_lens)
        flops = 2.0 * self.layer_matmul_params * tokens + 2.0 * self.lm_head_params * len(q_lens)
        for q, kv in zip(q_lens, kv_lens):  # causal: query i of the chunk sees kv - q + i + 1 keys
            keys = q * (kv - q) + q * (q + 1) / 2
            flops += self.attn_flops_per_query_key * keys
        kv_read = sum(kv - q for q, kv in zip(q_lens, kv_lens)) * self.kv_bytes_per_token
        kv_write = tokens * self.kv_bytes_per_token
        return flops, float(self.step_weight_bytes + kv_read + kv_write)


def roofline(flops: float, num_bytes: float, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    """max(bytes / copy bandwidth, FLOPs / matmul rate), with both parts and the bound."""
    if not ceilings.get("measured"):
        return None
    mem_s = num_bytes / ceilings["copy_bytes_per_s"]
    compute_s = flops / ceilings["matmul_bf16_flops_per_s"]
    return {"seconds": max(mem_s, compute_s), "memory_s": mem_s, "compute_s": compute_s,
            "bound": "memory" if mem_s >= compute_s else "compute", "flops": flops,
            "bytes": num_bytes}
