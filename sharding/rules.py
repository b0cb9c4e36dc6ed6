"""The one table mapping logical axis names to mesh axes, and PartitionSpecs derived from it.

Model code names every dimension logically (runtime/models/layers.py: vocab, embed, q_heads,
kv_heads, head_dim, mlp, norm); activations and the KV cache use tokens, pages and page_slot.
Tensor parallelism (Megatron style) splits q heads, KV heads, the MLP width and the vocab over
the ``model`` mesh axis and keeps the model dimension (embed) whole, so each layer needs one
all-reduce after o_proj and one after down_proj. Nothing is split over ``data``.

KV heads are the one rule that depends on the model: when tensor_parallel_size exceeds the KV
head count (or does not divide it) the K/V projections are replicated (see `rules_for`). The KV
cache is always split over ``model`` along its own axis, ``cache_heads``: K heads when tp divides
K, else tp heads, each device storing the one KV head its q heads read (`kv_cache_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from xlaserve.runtime.config import ModelConfig
from xlaserve.sharding.mesh import MODEL_AXIS

# Logical axis -> mesh axis (None: replicated). Every logical name used anywhere must be listed:
# an unknown name is an error, never silently replicated.
Rules = tuple[tuple[str, str | None], ...]

TP_RULES: Rules = (
    ("vocab", MODEL_AXIS),  # V: embedding rows and lm_head columns
    ("embed", None),  # D: the residual stream stays whole on every device
    ("q_heads", MODEL_AXIS),  # N
    ("kv_heads", MODEL_AXIS),  # K: switched to None by rules_for when tp > K
    ("cache_heads", MODEL_AXIS),  # the KV cache's stored heads (kv_cache_heads: K or tp)
    ("head_dim", None),  # H
    ("mlp", MODEL_AXIS),  # F
    ("norm", None),  # RMSNorm scales
    ("tokens", None),  # T: the flattened tokens of a step (activations, StepInputs)
    ("seqs", None),  # S: sequences of a step
    ("pages", None),  # P: KV pages
    ("page_slot", None),  # L: slots within a page
)

# Logical axes of one layer's k_pages / v_pages [C, P, L, H], C = kv_cache_heads(...).
KV_CACHE_AXES = ("cache_heads", "pages", "page_slot", "head_dim")


def kv_heads_sharded(model_cfg: ModelConfig, tp: int) -> bool:
    """True when the KV heads are split over ``model``: tp divides the KV head count."""
    return model_cfg.num_kv_heads % tp == 0


def kv_cache_heads(model_cfg: ModelConfig, tp: int) -> int:
    """C, the head count of the KV cache arrays [C, P, L, H] at this tp.

    K when tp divides K (each device stores K/tp heads). Otherwise tp (tp a multiple of K, as
    `mesh.validate_model` requires): stored head d is KV head d // (tp // K), so each device
    stores exactly the one KV head its q heads read, once, as vLLM does; a device never holds
    the other K - 1 heads.
    """
    return model_cfg.num_kv_heads if kv_heads_sharded(model_cfg, tp) else tp


def rules_for(model_cfg: ModelConfig, tp: int, base: Rules = TP_RULES) -> Rules:
    """The base table with kv_heads replicated when tp does not divide the KV head count.

    Args:
      model_cfg: the model being split.
      tp: tensor_parallel_size.
      base: the table to adjust.
    """
    if tp < 1:
        raise ValueError(f"tensor_parallel_size={tp}: must be >= 1")
    if kv_heads_sharded(model_cfg, tp):
        return base
    return tuple((name, None if name == "kv_heads" else axis) for name, axis in base)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = TP_RULES) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have the logical names `axes`.

    Args:
      axes: one logical name (or None: replicated) per array dimension.
      rules: logical -> mesh axis table.
    Raises:
      ValueError: an unknown logical name, or two dimensions of the array mapped to the same
        mesh axis (which would split the array twice over one axis).
    """
    table: Mapping[str, str | None] = dict(rules)
    spec: list[str | None] = []
    used: dict[str, str] = {}
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} (in {tuple(axes)}) has no sharding rule; "
                             f"known: {sorted(table)}")
        mesh_axis = table[name]
        if mesh_axis is not None:
            if mesh_axis in used:
                raise ValueError(f"logical axes {used[mesh_axis]!r} and {name!r} of one array "
                                 f"{tuple(axes)} both map to mesh axis {mesh_axis!r}")
            used[mesh_axis] = name
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def spec_to_str(spec: PartitionSpec) -> str:
    """A stable one-line form of a PartitionSpec for golden files, e.g. ``(None, 'model')``."""
    return "(" + ", ".join(repr(a) for a in spec) + ")"
