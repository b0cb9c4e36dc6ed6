"""One host->device copy per step: the small arrays of a StepInputs packed into one int32 vector.

A StepInputs holds about twenty small arrays (token ids, positions, slots, page table, sampling
controls). Handed to a compiled program one by one, each is its own host->device transfer, and
on the GPU every transfer costs host time and a stream synchronisation before the step can start
(measured on an H100: bench/results/diag_h100_*). `pack` lays them out back to back in one int32
vector (float32 and uint32 fields bit-cast), so a step moves one buffer; `unpack` rebuilds the
StepInputs inside the jitted program (slices and bit-casts, fused by XLA into their consumers).

Leaves named in SEPARATE (the [S, W] penalty histories) stay separate arguments: they are usually
a cached device array (nothing to copy) and can be large.

`PackSpec` is static (hashable): one per (T, S) bucket and history width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.batch import StepInputs

SEPARATE = (".sampling.prompt_token_ids", ".sampling.output_token_ids")
_WORD = np.dtype(np.int32)
_ALLOWED = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Where each leaf of a StepInputs lives: (offset, shape, dtype) in the vector, or separate.

    Attributes:
      treedef: the StepInputs pytree structure.
      slots: per leaf, in tree order, (offset, shape, dtype name) or None for a separate leaf.
      size: int32 words in the packed vector.
    """

    treedef: Any
    slots: tuple[tuple[int, tuple[int, ...], str] | None, ...]
    size: int


def spec_of(inputs: StepInputs) -> PackSpec:
    """The layout of `inputs` (shapes and dtypes only: works on ShapeDtypeStructs too)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(inputs)
    slots: list[tuple[int, tuple[int, ...], str] | None] = []
    offset = 0
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name in SEPARATE:
            slots.append(None)
            continue
        dtype = np.dtype(leaf.dtype)
        if dtype not in _ALLOWED:
            raise ValueError(f"inputs{name}.dtype={dtype}: packing takes 4-byte int32, uint32 "
                             f"or float32 leaves")
        shape = tuple(int(d) for d in leaf.shape)
        slots.append((offset, shape, dtype.name))
        offset += int(np.prod(shape, dtype=np.int64))
    return PackSpec(treedef, tuple(slots), offset)


def pack(inputs: StepInputs, spec: PackSpec) -> tuple[np.ndarray, tuple[Any, ...]]:
    """Host side: (the int32 vector, the separate leaves in tree order)."""
    leaves = jax.tree_util.tree_leaves(inputs)
    if len(leaves) != len(spec.slots):
        raise ValueError(f"inputs has {len(leaves)} leaves, the pack spec {len(spec.slots)}")
    buf = np.empty(spec.size, _WORD)
    separate = []
    for leaf, slot in zip(leaves, spec.slots, strict=True):
        if slot is None:
            separate.append(leaf)
            continue
        offset, shape, dtype = slot
        a = np.asarray(leaf)
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise ValueError(f"leaf {a.dtype}{list(a.shape)} does not match the pack spec "
                             f"{dtype}{list(shape)}")
        buf[offset:offset + a.size] = a.reshape(-1).view(_WORD)
    return buf, tuple(separate)


def unpack(packed: jax.Array, separate: tuple[jax.Array, ...], spec: PackSpec) -> StepInputs:
    """Inside jit: the StepInputs back from the vector and the separate leaves."""
    rest = iter(separate)
    leaves = []
    for slot in spec.slots:
        if slot is None:
            leaves.append(next(rest))
            continue
        offset, shape, dtype = slot
        n = int(np.prod(shape, dtype=np.int64))
        words = jax.lax.slice(packed, (offset,), (offset + n,)).reshape(shape)
        if np.dtype(dtype) != _WORD:
            words = jax.lax.bitcast_convert_type(words, jnp.dtype(dtype))
        leaves.append(words)
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)
