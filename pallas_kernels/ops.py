"""The `ragged_paged_attention` op and its dispatcher.

Implementations (each with the op's signature, all tested against the reference):
  "reference"         pure jnp (any platform); the ground truth.
  "pallas_triton"     the portable Pallas kernel compiled through the Triton lowering (NVIDIA GPU).
  "pallas_interpret"  the same kernel through the Pallas interpreter (any platform; slow: tests).
"auto" picks "pallas_triton" on GPU and "reference" elsewhere. The choice is logged once per
(platform, implementation, shape class). An explicitly requested implementation that is not
available raises RuntimeError: the dispatcher never falls back silently.

`write_kv_pages` has two implementations: "xla" (an XLA scatter, in place under donation) and
"pallas" (a Pallas kernel with input_output_aliases). "auto" takes the one measured faster on the
GPU for the step's token count (`write_impl_for`; bench/NOTES_attention.md).

`skinny_gemm_config` picks, for a decode-sized projection, the Pallas skinny GEMM's tiles or None
(XLA's GEMM): mode "auto" takes the kernel on GPU for shapes of the measured table
(skinny_gemm_tuning.json) only, "pallas" / "pallas_interpret" for any shape the tiles divide,
"xla" never; steps of more rows than the table's max_rows (16) always take XLA's GEMM (one tile
holds every row: on an H200 a 1024-row step's tile overflowed shared memory, session 13).
With `epilogue="swiglu"` it picks `skinny_gemm_swiglu`'s tiles (gate/up with SwiGLU's
activation; table entries marked "epilogue": "swiglu", one split). Each choice is logged once
per shape. XLASERVE_SKINNY_GEMM_TABLE names another table file (a sweep's output).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "reference", "pallas_triton", "pallas_interpret")
WRITE_IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
# Measured on one H100, both into donated pools (bench/results/attention_h100_write_mixed_model_
# call7.json and _call8.json, "write"): T=64: XLA scatter 43 / 83 us, Pallas 47 / 45 us (host
# dispatch bound, inconclusive); T=4096: XLA 87 / 89 us, Pallas 52 / 49 us. So "auto" takes the
# Pallas kernel on GPU from this many tokens on.
_PALLAS_WRITE_MIN_TOKENS = 1024
# ... and for the smallest decode steps: in the 8B model at batch 1 (T=16 bucket, ctx 1024) the
# Pallas kernel (one launch for K and V) beat XLA's two scatters by 0.03 ms per step, A/B/A/B in
# one run: 5.996 / 5.990 vs 6.033 / 6.023 ms (bench/results/session4_h100/latency_1k_write_*).
# Steps between the two bounds keep the XLA scatter (not measured in the model).
_PALLAS_WRITE_SMALL_MAX_TOKENS = 16


def _platform(platform: str | None) -> str:
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "gpu") else platform


def _jax_minor() -> tuple[int, int]:
    """(major, minor) of the running jax, e.g. (0, 11)."""
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0)
                    for part in jax.__version__.split(".")[:2])
    return major, minor


def available_implementations(platform: str | None = None) -> dict[str, str]:
    """Maps implementation name -> "available" or the reason it is not, on `platform`."""
    platform = _platform(platform)
    triton = "available"
    if platform != "gpu":
        triton = f"needs an NVIDIA GPU (platform is {platform!r})"
    else:
        try:
            from jax.experimental.pallas import triton as _  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the jax build
            triton = f"jax.experimental.pallas.triton does not import: {e}"
        else:
            if _jax_minor() >= (0, 11):
                triton = (f"available (jax {jax.__version__} deprecates the Pallas Triton "
                          f"backend; no removal version named yet, bench/NOTES_mosaic_gpu.md)")
    return {"reference": "available", "pallas_triton": triton,
            "pallas_interpret": "available (interpreter: for tests, slow)"}


@functools.lru_cache(maxsize=None)
def _log_choice(platform: str, impl: str, requested: str, shape_class: str) -> None:
    """Logs once per distinct argument tuple (lru_cache remembers what was logged)."""
    log.info("ragged_paged_attention: chose %r on %s (requested %r, shapes %s)", impl, platform,
             requested, shape_class)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` resolves to on `platform`; raises if it is not available."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: must be one of {IMPLEMENTATIONS}")
    platform = _platform(platform)
    if impl == "auto":
        return "pallas_triton" if platform == "gpu" else "reference"
    reason = available_implementations(platform)[impl]
    if not reason.startswith("available"):
        raise RuntimeError(f"ragged_paged_attention impl={impl!r} is not available: {reason}")
    return impl


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           kv_lens: jax.Array, page_table: jax.Array, cu_q_lens: jax.Array,
                           num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           impl: str = "auto") -> jax.Array:
    """Dispatches to an implementation of ragged paged attention. See ragged_paged_attention.py.

    Args:
      q: [T, N, H]. k_pages, v_pages: [K, P, L, H]. kv_lens: i32[S]. page_table: i32[S, M].
      cu_q_lens: i32[S+1]. num_seqs: i32[1]. impl: one of IMPLEMENTATIONS.
    Returns:
      [T, N, H] attention output in q's dtype (padded rows 0).
    """
    platform = _platform(None)
    chosen = resolve_impl(impl, platform)
    from xlaserve.pallas_kernels.tuning import q_len_class

    _log_choice(platform, chosen, impl,
                f"H{q.shape[-1]} L{k_pages.shape[2]} G{q.shape[1] // k_pages.shape[0]} "
                f"{q_len_class(q.shape[0], page_table.shape[0])}")
    args = (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    if chosen == "reference":
        return rpa.ragged_paged_attention_reference(*args, sm_scale=sm_scale,
                                                    sliding_window=sliding_window,
                                                    soft_cap=soft_cap)
    return rpa.ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, interpret=chosen == "pallas_interpret")


def write_impl_for(num_tokens: int, platform: str | None = None) -> str:
    """The K/V write "auto" takes for a step of `num_tokens` tokens: "pallas" or "xla"."""
    if _platform(platform) != "gpu":
        return "xla"
    small = num_tokens <= _PALLAS_WRITE_SMALL_MAX_TOKENS
    return "pallas" if small or num_tokens >= _PALLAS_WRITE_MIN_TOKENS else "xla"


def write_kv_pages(k_pages: jax.Array, v_pages: jax.Array, k_new: jax.Array, v_new: jax.Array,
                   slot_mapping: jax.Array, *, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V ([T, K, H]) into their slots of the [K, P, L, H] pools.

    In place when the caller's jit donates the pools. impl: "auto", "xla", "pallas" (GPU only)
    or "pallas_interpret".
    """
    if impl not in WRITE_IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: must be one of {WRITE_IMPLEMENTATIONS}")
    chosen = write_impl_for(slot_mapping.shape[0]) if impl == "auto" else impl
    if chosen == "pallas" and _platform(None) != "gpu":
        raise RuntimeError(f"write_kv_pages impl='pallas' needs an NVIDIA GPU (platform is "
                           f"{_platform(None)!r})")
    if chosen == "xla":
        return rpa.write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slot_mapping)
    return rpa.write_kv_pages(k_pages, v_pages, k_new, v_new, slot_mapping,
                              interpret=chosen == "pallas_interpret")


# ------------------------------------------------------------------------------- skinny GEMM

SKINNY_GEMM_MODES = ("auto", "xla", "pallas", "pallas_interpret")
SKINNY_GEMM_TABLE = Path(__file__).with_name("skinny_gemm_tuning.json")


def skinny_gemm_table_path() -> Path:
    """The table in force: XLASERVE_SKINNY_GEMM_TABLE (a sweep's output, bench/gemm_decode.py)
    or the one beside this file."""
    return Path(os.environ.get("XLASERVE_SKINNY_GEMM_TABLE") or SKINNY_GEMM_TABLE)


# A table key: (K, N = the weights' total width, dtype, epilogue); epilogue "" for the split-K
# partials of `skinny_gemm`, "swiglu" for `skinny_gemm_swiglu` (N = gate + up).
TableKey = tuple[int, int, str, str]
EPILOGUES = ("", "swiglu")


@functools.lru_cache(maxsize=None)
def _read_table(path: Path) -> tuple[dict[str, Any], dict[TableKey, SkinnyGemmConfig]]:
    data = json.loads(path.read_text())
    table = {(e["k"], e["n"], e["dtype"], e.get("epilogue", "")): SkinnyGemmConfig(
        block_n=e["block_n"], block_k=e["block_k"], num_splits=e["num_splits"],
        num_warps=e["num_warps"], num_stages=e["num_stages"]) for e in data["entries"]}
    return data, table


def skinny_gemm_table() -> tuple[int, dict[TableKey, SkinnyGemmConfig]]:
    """(max_rows, {(K, N, dtype, epilogue): SkinnyGemmConfig}) from the table in force."""
    data, table = _read_table(skinny_gemm_table_path())
    return int(data["max_rows"]), table


def describe_skinny_gemm(mode: str, platform: str | None = None) -> str:
    """One line on what decode-sized projections run on (for `xlaserve profile` and logs)."""
    if mode == "xla":
        return "XLA's GEMMs (decode_gemm='xla')"
    if mode == "auto" and _platform(platform) != "gpu":
        return (f"XLA's GEMMs (decode_gemm='auto': the Pallas skinny GEMM needs an NVIDIA GPU; "
                f"platform is {_platform(platform)!r})")
    def epilogue(where: str) -> str:
        return ("; after q/k/v's, rope and the K/V write run as one kernel (rope_write_kv) "
                "where each device holds its KV heads and the model has no q/k norm; gate/up "
                f"with SwiGLU's activation in one kernel (skinny_gemm_swiglu) where {where}")

    if mode != "auto":
        return (f"the Pallas skinny GEMM for every shape its tiles divide in steps of up to "
                f"{_read_table(skinny_gemm_table_path())[0]['max_rows']} tokens "
                f"(decode_gemm={mode!r})" + epilogue("its shape divides the tiles"))
    path = skinny_gemm_table_path()
    data, _ = _read_table(path)
    names = ", ".join(e.get("name", f"{e['k']}x{e['n']}") for e in data["entries"])
    return (f"the Pallas skinny GEMM for steps of up to {data['max_rows']} tokens whose q/k/v, "
            f"o_proj or down_proj shape is in {path.name} (measured on {data['device']}, "
            f"jax {data['jax']}: {names or 'none'}); XLA's GEMM for the others"
            + epilogue("its shape is in the table too"))


def default_skinny_gemm_config(k: int, ns: Sequence[int], epilogue: str = "",
                               ) -> SkinnyGemmConfig | None:
    """Tiles for a shape missing from the table (modes "pallas" / "pallas_interpret"): the
    widest block_n (<= 64) dividing every N, block_k 128 (or less), and splits until the grid
    has >= 128 programs (one split for the "swiglu" epilogue, which needs whole sums); None
    when no power-of-two tile >= 16 divides the shape."""
    bn = next((b for b in (64, 32, 16) if all(n % b == 0 for n in ns)), None)
    bk = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
    if bn is None or bk is None:
        return None
    split = 1
    while not epilogue and sum(ns) // bn * split < 128 and k % (2 * split * bk) == 0:
        split *= 2
    return SkinnyGemmConfig(block_n=bn, block_k=bk, num_splits=split)


@functools.lru_cache(maxsize=None)
def _log_gemm_choice(mode: str, shape: str, choice: str) -> None:
    log.info("skinny_gemm (mode %r) for %s: %s", mode, shape, choice)


@functools.lru_cache(maxsize=None)
def log_rope_write_choice(shape: str, choice: str) -> None:
    """Logs once per shape whether q/k/v's epilogue runs as `rope_write_kv`."""
    log.info("q/k/v epilogue for %s: %s", shape, choice)


def skinny_gemm_config(m: int, k: int, ns: Sequence[int], dtype: Any, mode: str = "auto",
                       platform: str | None = None, epilogue: str = "",
                       ) -> SkinnyGemmConfig | None:
    """The kernel's tiles for x [m, k] times weights [k, n] (n in `ns`), or None: XLA's GEMM.
    `epilogue` "swiglu": `skinny_gemm_swiglu`'s tiles (`ns` = the gate and up widths), looked up
    under its own table entries.

    Raises:
      ValueError: an unknown mode or epilogue. RuntimeError: mode "pallas" off GPU.
    """
    if mode not in SKINNY_GEMM_MODES:
        raise ValueError(f"skinny_gemm mode={mode!r}: must be one of {SKINNY_GEMM_MODES}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"skinny_gemm epilogue={epilogue!r}: must be one of {EPILOGUES}")
    platform = _platform(platform)
    if mode == "pallas" and platform != "gpu":
        raise RuntimeError(f"skinny_gemm mode='pallas' needs an NVIDIA GPU (platform is "
                           f"{platform!r}); 'pallas_interpret' runs anywhere")
    ns = tuple(int(n) for n in ns)
    shape = (f"[{m}, {k}] x [{k}, {'+'.join(map(str, ns))}] {jnp.dtype(dtype).name}"
             + (f" with the {epilogue} epilogue" if epilogue else ""))
    if mode == "xla" or (mode == "auto" and platform != "gpu"):
        return None
    max_rows, table = skinny_gemm_table()
    if m > max_rows:  # every mode: the kernel holds all rows in one tile (decode-sized steps)
        _log_gemm_choice(mode, shape, f"XLA's GEMM ({m} rows > {max_rows})")
        return None
    cfg = table.get((k, sum(ns), jnp.dtype(dtype).name, epilogue))
    if cfg is not None and (cfg.fits(k, ns) is not None or (epilogue and cfg.num_splits != 1)):
        cfg = None  # the weights split at other widths than the table's entry
    if mode == "auto":
        if cfg is None:
            _log_gemm_choice(mode, shape,
                             "XLA's GEMM (no measured entry in skinny_gemm_tuning.json)")
            return None
    elif cfg is None:
        cfg = default_skinny_gemm_config(k, ns, epilogue)
        if cfg is None:
            raise ValueError(f"skinny_gemm mode={mode!r}: no tile divides {shape}")
    _log_gemm_choice(mode, shape, f"Pallas kernel {cfg}")
    return cfg
