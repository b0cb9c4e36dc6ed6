"""PTX of xlaserve's one-shot all-reduce kernels (launched by sharding/all_reduce.py).

Two kernels share one protocol (NCCL's "LL" idea; the module docstring of all_reduce.py explains
it) and one workspace layout:
  * `all_reduce_ptx`: out = sum over ranks of x (float32 sum in rank order, rounded once).
  * `add_rms_norm_ptx`: the same sum s, then, fused, the pre-norm residual block's next two
    steps: x_new = residual + s and h = RMSNorm(x_new) * scale, as the model computes them in
    its dtype (s rounded, then the add rounded, the norm in float32, rounded, times the scale,
    rounded). One CTA per row (token), so the row's sum of squares is a CTA reduction.

Generated as text (no Triton or CUDA toolkit at run time); tests assemble every variant with
ptxas where it is installed.
"""

from __future__ import annotations

import struct
from typing import Any

import jax.numpy as jnp

THREADS = 256  # per CTA (8 warps)
CHUNK_BYTES = 8192  # payload per CTA and rank: 2 16-byte vectors per thread
LL_CHUNK_BYTES = 2 * CHUNK_BYTES  # in the workspace: every 4 payload bytes carry a 4-byte flag
MAX_CTAS = 128
MAX_RANKS = 8
COUNTER_OFFSET = 0  # u32 per CTA
DATA_OFFSET = 4096
TIMEOUT_NS = 10_000_000_000
DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _accumulate(dtype: str, words: list[str], first: bool) -> list[str]:
    """PTX adding one 16-byte vector (4 b32 registers) into the float32 accumulators %acc*."""
    op = "mov.f32 {a}, {v};" if first else "add.f32 {a}, {a}, {v};"
    lines = []
    if dtype == "f32":
        for k, w in enumerate(words):
            lines += [f"mov.b32 %fv, {w};", op.format(a=f"%acc{k}", v="%fv")]
        return lines
    for k, w in enumerate(words):
        lo, hi = f"%acc{2 * k}", f"%acc{2 * k + 1}"
        if dtype == "bf16":  # bf16 -> f32 is a 16-bit shift
            lines += [f"shl.b32 %u, {w}, 16;", "mov.b32 %fv, %u;", op.format(a=lo, v="%fv"),
                      f"and.b32 %u, {w}, 0xFFFF0000;", "mov.b32 %fv, %u;",
                      op.format(a=hi, v="%fv")]
        else:
            lines += [f"mov.b32 {{%h0, %h1}}, {w};", "cvt.f32.f16 %fv, %h0;",
                      op.format(a=lo, v="%fv"), "cvt.f32.f16 %fv, %h1;", op.format(a=hi, v="%fv")]
    return lines


def _pack_regs(dtype: str, src: list[str], words: list[str]) -> list[str]:
    """PTX rounding float32 registers `src` (8, or 4 for f32) into 4 b32 `words`."""
    if dtype == "f32":
        return [f"mov.b32 {w}, {s};" for w, s in zip(words, src)]
    cvt = "cvt.rn.bf16x2.f32" if dtype == "bf16" else "cvt.rn.f16x2.f32"
    return [f"{cvt} {w}, {src[2 * k + 1]}, {src[2 * k]};" for k, w in enumerate(words)]  # hi, lo


def _unpack_regs(dtype: str, words: list[str], dst: list[str]) -> list[str]:
    """PTX widening 4 b32 `words` (one 16-byte vector) into float32 registers `dst`."""
    if dtype == "f32":
        return [f"mov.b32 {d}, {w};" for w, d in zip(words, dst)]
    lines = []
    for k, w in enumerate(words):
        lo, hi = dst[2 * k], dst[2 * k + 1]
        if dtype == "bf16":
            lines += [f"shl.b32 %u, {w}, 16;", f"mov.b32 {lo}, %u;",
                      f"and.b32 %u, {w}, 0xFFFF0000;", f"mov.b32 {hi}, %u;"]
        else:
            lines += [f"mov.b32 {{%h0, %h1}}, {w};", f"cvt.f32.f16 {lo}, %h0;",
                      f"cvt.f32.f16 {hi}, %h1;"]
    return lines


def _round_regs(dtype: str, src: list[str], words: list[str], dst: list[str]) -> list[str]:
    """PTX rounding float32 `src` to the dtype into float32 `dst` (through the b32 `words`)."""
    return _pack_regs(dtype, src, words) + _unpack_regs(dtype, words, dst)


def _pack(dtype: str) -> list[str]:
    """PTX rounding the accumulators into %w0..%w3 (the output vector)."""
    n = 4 if dtype == "f32" else 8
    return _pack_regs(dtype, [f"%acc{k}" for k in range(n)], [f"%w{k}" for k in range(4)])


def _f32(value: float) -> str:
    """A PTX float32 literal (exact bits)."""
    return "0f" + struct.pack(">f", value).hex().upper()


Ranges = tuple[tuple[int, int], ...]  # (start, end) of each rank's device allocation


def kernel_name(tp: int, dtype: Any, ranges: Ranges | None = None) -> str:
    return f"xlaserve_all_reduce_tp{tp}_{DTYPES[jnp.dtype(dtype).name]}{'_rr' if ranges else ''}"


def add_rms_norm_kernel_name(tp: int, dtype: Any, dim: int, eps: float,
                             partials: tuple[int, int] | None = None,
                             ranges: Ranges | None = None) -> str:
    k = f"_k{partials[0]}x{partials[1]}" if partials else ""
    return (f"xlaserve_all_reduce_add_rms_norm_tp{tp}_{DTYPES[jnp.dtype(dtype).name]}"
            f"_d{dim}_e{_f32(eps)[2:]}{k}{'_rr' if ranges else ''}")


def _check_tp(tp: int) -> None:
    if not 2 <= tp <= MAX_RANKS:
        raise ValueError(f"tp={tp}: the custom all-reduce supports 2..{MAX_RANKS} ranks")


def _load_params(emit: Any, tp: int, buffers: tuple[tuple[str, str], ...]) -> None:
    """Loads the (parameter, register) buffer pointers as global addresses, then the workspace
    addresses %ws0.. (already global: peers' too)."""
    for name_, reg in buffers:
        emit(f"ld.param.u64 {reg}, [{name_}];")
        emit(f"cvta.to.global.u64 {reg}, {reg};")
    for r in range(tp):
        emit(f"ld.param.u64 %ws{r}, [p_ws{r}];")


def _rank_and_sequence(emit: Any, tp: int, name: str, ranges: Ranges | None = None) -> None:
    """This rank (%rank; predicates %peq/%pne per rank; its own workspace %wsl) and this CTA's
    sequence number (%seq) and slot (%slot).

    Without `ranges` the rank is loaded from the rank buffer, and thread 0 then reads the CTA's
    counter and shares it through `{name}_seq` (two dependent global loads and a barrier before
    the first push). With `ranges` ((start, end) of each rank's device allocation, in rank
    order) the rank is the range holding the output pointer %outp, known without a load (the
    rank buffer is read only when no range holds it), and every thread reads the counter
    itself: one global load before the first push. Every thread must then pass a barrier
    before thread 0 stores the new count (both kernels have one before that store)."""
    if ranges:
        emit("mov.u32 %rank, -1;")
        for r, (start, end) in enumerate(ranges):
            emit(f"setp.ge.u64 %p, %outp, {start};")
            emit(f"setp.lt.and.u64 %p, %outp, {end}, %p;")
            emit(f"selp.u32 %rank, {r}, %rank, %p;")
        emit("setp.ne.u32 %p, %rank, -1;")
        emit("@%p bra RANK_KNOWN;")
        emit("ld.global.nc.u32 %rank, [%rankp];")
        emit("RANK_KNOWN:")
    else:
        emit("ld.global.nc.u32 %rank, [%rankp];")
    emit("mov.u64 %wsl, %ws0;")
    for r in range(tp):
        emit(f"setp.eq.u32 %peq{r}, %rank, {r};")
        emit(f"setp.ne.u32 %pne{r}, %rank, {r};")
        if r:
            emit(f"selp.b64 %wsl, %ws{r}, %wsl, %peq{r};")
    # This CTA's call counter -> sequence number (the flag value of this call), shared.
    emit("setp.eq.u32 %is0, %th, 0;")
    emit("mul.wide.u32 %off, %cta, 4;")
    emit(f"add.u64 %cnt, %wsl, {COUNTER_OFFSET};")
    emit("add.u64 %cnt, %cnt, %off;")
    if ranges:
        emit("ld.global.cg.u32 %seq, [%cnt];")
        emit("add.u32 %seq, %seq, 1;")
    else:
        emit("@!%is0 bra SEQ_DONE;")
        emit("ld.global.cg.u32 %seq, [%cnt];")
        emit("add.u32 %seq, %seq, 1;")
        emit(f"st.shared.u32 [{name}_seq], %seq;")
        emit("SEQ_DONE:")
        emit("bar.sync 0;")
        emit(f"ld.shared.u32 %seq, [{name}_seq];")
    emit("and.b32 %slot, %seq, 1;")


def _push(emit: Any, tp: int) -> None:
    """Stores the vector in %w0..3 (at byte %loc of this CTA's LL chunk) into every peer's
    workspace: two 16-byte LL lines {d0, seq, d1, seq}, {d2, seq, d3, seq}; every 8-byte half
    carries its own flag, so the reader needs no fence (8-byte stores arrive whole)."""
    emit("add.u32 %t, %blk, %rank;")
    emit(f"mul.wide.u32 %b, %t, {LL_CHUNK_BYTES};")
    emit("add.u64 %b, %b, %loc;")
    emit(f"add.u64 %b, %b, {DATA_OFFSET};")
    for r in range(tp):
        emit(f"add.u64 %a, %ws{r}, %b;")
        emit(f"@%pne{r} st.volatile.global.v4.b32 [%a], {{%w0, %seq, %w1, %seq}};")
        emit(f"@%pne{r} st.volatile.global.v4.b32 [%a+16], {{%w2, %seq, %w3, %seq}};")


def _poll_sum(emit: Any, body: list[str], tp: int, dt: str, tag: str = "") -> None:
    """Sums, in rank order into %acc*, this rank's vector (%w0..3) and each peer's from this
    workspace (byte %loc of the LL chunk) once both of its LL lines carry this call's flag
    (volatile loads: never a stale L1 line). A wait over TIMEOUT_NS traps."""
    for r in range(tp):
        emit(f"@%peq{r} bra OWN{r}{tag};")
        emit(f"add.u32 %t, %blk, {r};")
        emit(f"mul.wide.u32 %b, %t, {LL_CHUNK_BYTES};")
        emit("add.u64 %b, %b, %loc;")
        emit(f"add.u64 %b, %b, {DATA_OFFSET};")
        emit("add.u64 %b, %wsl, %b;")
        emit("mov.u64 %start, %globaltimer;")
        emit(f"SPIN{r}{tag}:")
        emit("ld.volatile.global.v4.b32 {%q0, %f0, %q1, %f1}, [%b];")
        emit("ld.volatile.global.v4.b32 {%q2, %f2, %q3, %f3}, [%b+16];")
        emit("setp.eq.u32 %p, %f0, %seq;")
        for f in ("%f1", "%f2", "%f3"):
            emit(f"setp.eq.and.u32 %p, {f}, %seq, %p;")
        emit(f"@%p bra GOT{r}{tag};")
        emit("mov.u64 %now, %globaltimer;")
        emit("sub.u64 %now, %now, %start;")
        emit(f"setp.gt.u64 %p, %now, {TIMEOUT_NS};")
        emit("@%p trap;")
        emit(f"bra SPIN{r}{tag};")
        emit(f"OWN{r}{tag}:")
        for k in range(4):
            emit(f"mov.b32 %q{k}, %w{k};")
        emit(f"GOT{r}{tag}:")
        body.extend(_accumulate(dt, ["%q0", "%q1", "%q2", "%q3"], first=(r == 0)))


_COMMON_REGS = (
    ".reg .pred %p, %is0, %peq<8>, %pne<8>;",
    ".reg .b32 %th, %nthr, %cta, %rank, %seq, %slot, %nvec, %vbeg, %vend, %v, %blk, %t, "
    "%u, %w0, %w1, %w2, %w3, %q0, %q1, %q2, %q3, %f0, %f1, %f2, %f3;",
    ".reg .b16 %h0, %h1;",
    ".reg .b64 %xp, %rankp, %outp, %wsl, %cnt, %a, %b, %off, %loc, %start, %now;",
)


def _entry(name: str, arch: int, dt: str, tp: int, what: str, shared: list[str],
           buffers: list[str], scalars: list[str], body: list[str]) -> str:
    """The module text: `buffers` (u64 pointer parameters), the tp workspace addresses, then
    `scalars` (full declarations), with `shared` declarations and the `body` lines."""
    lines = "\n".join("    " + b if not b.endswith(":") else b for b in body)
    params = ([f"    .param .u64 {b}" for b in buffers]
              + [f"    .param .u64 p_ws{r}" for r in range(tp)] + scalars)
    return (f"//\n// xlaserve one-shot {what}, tp={tp}, {dt}\n//\n"
            f".version 7.8\n.target sm_{arch}\n.address_size 64\n\n"
            + "".join(x + "\n" for x in shared) + "\n"
            f".visible .entry {name}(\n" + ",\n".join(params) + "\n)\n"
            f".maxntid {THREADS}, 1, 1\n{{\n{lines}\n}}\n")


def all_reduce_ptx(tp: int, dtype: Any, arch: int, ranges: Ranges | None = None) -> str:
    """The PTX of the all-reduce for `tp` ranks and `dtype` on compute capability `arch`.

    Parameters, in order: x, rank (i32[1]), out (buffers); the tp workspace addresses (u64);
    nvec, the message's 16-byte vectors (u32). Pointers a jaxlib appends after them (0.11's
    launcher adds global-scratch and profiling pointers) are not declared: the driver reads only
    the declared parameters. Each CTA owns CHUNK_BYTES of the message. `ranges`: each rank's
    device allocation (start, end), so the rank comes from the output pointer without a load
    (`_rank_and_sequence`; the name then ends in "_rr").
    """
    _check_tp(tp)
    dt = DTYPES[jnp.dtype(dtype).name]
    name = kernel_name(tp, dtype, ranges)
    chunk_vec = CHUNK_BYTES // 16
    nacc = 4 if dt == "f32" else 8
    vec = "{%w0, %w1, %w2, %w3}"
    body: list[str] = list(_COMMON_REGS)
    emit = body.append
    emit(f".reg .b64 %ws<{tp}>;")
    emit(f".reg .f32 %fv, %acc<{nacc}>;")
    _load_params(emit, tp, (("p_x", "%xp"), ("p_rank", "%rankp"), ("p_out", "%outp")))
    emit("ld.param.u32 %nvec, [p_nvec];")
    emit("mov.u32 %th, %tid.x;")
    emit("mov.u32 %nthr, %ntid.x;")
    emit("mov.u32 %cta, %ctaid.x;")
    _rank_and_sequence(emit, tp, name, ranges)
    emit(f"mul.lo.u32 %vbeg, %cta, {chunk_vec};")
    emit(f"add.u32 %vend, %vbeg, {chunk_vec};")
    emit("min.u32 %vend, %vend, %nvec;")
    emit("mad.lo.u32 %t, %cta, 2, %slot;")
    emit(f"mul.lo.u32 %blk, %t, {tp};")  # LL block of (cta, slot, source 0)
    # 1. push: each 16-byte vector of x goes to every peer
    emit("add.u32 %v, %vbeg, %th;")
    emit("PUSH_LOOP:")
    emit("setp.ge.u32 %p, %v, %vend;")
    emit("@%p bra PUSH_DONE;")
    emit("mul.wide.u32 %off, %v, 16;")
    emit("add.u64 %a, %xp, %off;")
    emit(f"ld.global.v4.b32 {vec}, [%a];")
    emit("sub.u32 %t, %v, %vbeg;")
    emit("mul.wide.u32 %loc, %t, 32;")
    _push(emit, tp)
    emit("add.u32 %v, %v, %nthr;")
    emit("bra PUSH_LOOP;")
    emit("PUSH_DONE:")
    # 2. sum in rank order
    emit("add.u32 %v, %vbeg, %th;")
    emit("RED_LOOP:")
    emit("setp.ge.u32 %p, %v, %vend;")
    emit("@%p bra RED_DONE;")
    emit("mul.wide.u32 %off, %v, 16;")
    emit("sub.u32 %t, %v, %vbeg;")
    emit("mul.wide.u32 %loc, %t, 32;")
    emit("add.u64 %a, %xp, %off;")
    emit(f"ld.global.v4.b32 {vec}, [%a];")
    _poll_sum(emit, body, tp, dt)
    body.extend(_pack(dt))
    emit("add.u64 %a, %outp, %off;")
    emit(f"st.global.v4.b32 [%a], {vec};")
    emit("add.u32 %v, %v, %nthr;")
    emit("bra RED_LOOP;")
    emit("RED_DONE:")
    if ranges:  # every thread has read the counter before thread 0 stores the new count
        emit("bar.sync 0;")
    emit("@%is0 st.global.u32 [%cnt], %seq;")
    emit("ret;")
    return _entry(name, arch, dt, tp, "all-reduce", [f".shared .align 4 .u32 {name}_seq;"],
                  ["p_x", "p_rank", "p_out"], ["    .param .u32 p_nvec"], body)


def add_rms_norm_row_ok(dim: int, dtype: Any) -> bool:
    """True when one CTA can hold a row of `dim` elements (the fused kernel's limit)."""
    row = dim * jnp.dtype(dtype).itemsize
    return 0 < row <= CHUNK_BYTES and row % 16 == 0


def add_rms_norm_ptx(tp: int, dtype: Any, arch: int, dim: int, eps: float,
                     partials: tuple[int, int] | None = None,
                     ranges: Ranges | None = None) -> str:
    """The PTX of the all-reduce fused with the residual add and RMSNorm that follow it.

    For each row (token) t, one CTA: s = sum over ranks of x[t] (float32, rank order, rounded to
    the dtype), x_new[t] = residual[t] + s (rounded), h[t] = (x_new[t] * rsqrt(mean(x_new[t]^2)
    + eps), rounded) * scale (rounded) -- `layers.rms_norm` of `residual + all_reduce(x)`.

    `partials` = (S, T): x is float32 [S, T, dim], S split-K partial products of this rank's
    slice (an explicit split-K GEMM); the kernel sums them (float32, in order) and rounds the
    sum to the dtype before the exchange, so no separate reduce kernel runs before it.

    Only the first `rows` rows carry tokens (rows: i32[1], the step's real token count, the
    same on every rank): the CTAs of the others store zeros to both outputs and exchange
    nothing (a batch-1 decode step pads 1 token to 16 rows).

    Parameters, in order: x, rank (i32[1]), rows (i32[1]), residual, scale [dim], out_x, out_h
    (buffers); the tp workspace addresses (u64). The grid is one CTA per row (at most
    MAX_CTAS). `dim`, `eps` and `partials` are constants of the code (they are in the kernel's
    name). `ranges`: as `all_reduce_ptx`'s. (Variants measured without gain and removed: the
    epilogue's one barrier and lazy clock read, session 27, commit fd59fa4; a joint wait for
    all of a thread's vectors of a peer's row, session 28, commit 80761d0.)
    """
    _check_tp(tp)
    if not add_rms_norm_row_ok(dim, dtype):
        raise ValueError(f"dim={dim} {jnp.dtype(dtype).name}: a row must be a multiple of 16 "
                         f"bytes and at most {CHUNK_BYTES} (one CTA)")
    if partials is not None and (partials[0] < 1 or not 1 <= partials[1] <= MAX_CTAS):
        raise ValueError(f"partials={partials}: needs (S >= 1, 1 <= T <= {MAX_CTAS})")
    dt = DTYPES[jnp.dtype(dtype).name]
    name = add_rms_norm_kernel_name(tp, dtype, dim, eps, partials, ranges)
    row_vec = dim * jnp.dtype(dtype).itemsize // 16
    per_thread = -(-row_vec // THREADS)
    n = 4 if dt == "f32" else 8  # elements per 16-byte vector
    w = [f"%w{k}" for k in range(4)]
    s = [f"%s{k}" for k in range(n)]
    acc = [f"%acc{k}" for k in range(n)]
    vec = "{%w0, %w1, %w2, %w3}"
    body: list[str] = list(_COMMON_REGS)
    emit = body.append
    emit(f".reg .b64 %ws<{tp}>, %resp, %scp, %outhp, %rowsp;")
    emit(".reg .b32 %nrows;")
    emit(f".reg .pred %pv<{per_thread}>;")
    emit(f".reg .f32 %fv, %fr, %ss, %rstd, %acc<{n}>, %s<{n}>, %xn<{per_thread * n}>;")
    emit(f".reg .b32 %lane, %warp, %r<{4 * per_thread}>, %c<{4 * per_thread}>;")
    emit(f".reg .b32 %o<{4 * per_thread}>;")  # this rank's row (rounded), per vector
    if partials:
        emit(f".reg .f32 %pp<{partials[0] * n * per_thread}>;")
    _load_params(emit, tp, (("p_x", "%xp"), ("p_rank", "%rankp"), ("p_rows", "%rowsp"),
                            ("p_res", "%resp"), ("p_scale", "%scp"), ("p_out", "%outp"),
                            ("p_outh", "%outhp")))
    emit("mov.u32 %th, %tid.x;")
    emit("mov.u32 %cta, %ctaid.x;")
    emit(f"mul.lo.u32 %vbeg, %cta, {row_vec};")
    for j in range(per_thread):  # thread th owns vectors th, th + THREADS, ... of the row
        emit(f"setp.lt.u32 %pv{j}, %th, {row_vec - j * THREADS};")

    def locate(j: int) -> None:  # %off: byte of the vector in the [T, dim] arrays; %loc: in LL
        emit(f"add.u32 %t, %th, {j * THREADS};")
        emit("mul.wide.u32 %loc, %t, 32;")
        emit("add.u32 %v, %vbeg, %t;")
        emit("mul.wide.u32 %off, %v, 16;")

    # 0. every load that does not need the sequence number goes first: the rows count, this
    #    thread's residual and scale vectors and its share of x (or of the partials), so their
    #    latencies overlap the counter's (thread 0, then a barrier) instead of following it.
    #    A padding row (cta >= rows, the same on every rank) then stores zeros and exchanges
    #    nothing; it reads its counter but never writes it.
    emit("ld.global.nc.u32 %nrows, [%rowsp];")
    for j in range(per_thread):
        res, sc = [f"%r{4 * j + k}" for k in range(4)], [f"%c{4 * j + k}" for k in range(4)]
        emit(f"@!%pv{j} bra LOADED{j};")
        locate(j)
        emit("add.u64 %a, %resp, %off;")
        emit(f"ld.global.v4.b32 {{{', '.join(res)}}}, [%a];")
        emit(f"add.u32 %t, %th, {j * THREADS};")
        emit("mul.wide.u32 %a, %t, 16;")
        emit("add.u64 %a, %scp, %a;")
        emit(f"ld.global.nc.v4.b32 {{{', '.join(sc)}}}, [%a];")
        if partials:
            _load_partials(emit, partials, dim, n, j)
        else:
            emit("add.u64 %a, %xp, %off;")
            emit(f"ld.global.v4.b32 {{{', '.join(f'%o{4 * j + k}' for k in range(4))}}}, [%a];")
        emit(f"LOADED{j}:")
    _rank_and_sequence(emit, tp, name, ranges)
    emit("setp.lt.u32 %p, %cta, %nrows;")
    emit("@%p bra LIVE;")
    emit("mov.b32 %u, 0;")
    for j in range(per_thread):
        emit(f"@!%pv{j} bra ZEROED{j};")
        locate(j)
        for ptr in ("%outp", "%outhp"):
            emit(f"add.u64 %a, {ptr}, %off;")
            emit("st.global.v4.b32 [%a], {%u, %u, %u, %u};")
        emit(f"ZEROED{j}:")
    emit("ret;")
    emit("LIVE:")
    emit("mad.lo.u32 %t, %cta, 2, %slot;")
    emit(f"mul.lo.u32 %blk, %t, {tp};")  # LL block of (cta, slot, source 0)

    # 1. push this rank's row (the partials' rounded sum) to every peer
    for j in range(per_thread):
        emit(f"@!%pv{j} bra PUSHED{j};")
        locate(j)
        if partials:
            _add_partials(emit, body, dt, partials, n, j)
            body.extend(f"mov.b32 %o{4 * j + k}, %w{k};" for k in range(4))
        else:
            body.extend(f"mov.b32 %w{k}, %o{4 * j + k};" for k in range(4))
        _push(emit, tp)
        emit(f"PUSHED{j}:")
    # 2. s = the sum (rounded); x_new = residual + s (rounded), stored; sum of squares of x_new
    emit(f"mov.f32 %ss, {_f32(0.0)};")
    for j in range(per_thread):
        xn = [f"%xn{j * n + k}" for k in range(n)]
        emit(f"@!%pv{j} bra SUMMED{j};")
        locate(j)
        body.extend(f"mov.b32 %w{k}, %o{4 * j + k};" for k in range(4))  # this rank's row
        _poll_sum(emit, body, tp, dt, tag=f"_{j}")
        body.extend(_round_regs(dt, acc, w, s))  # the sum, rounded as the plain kernel's
        body.extend(_unpack_regs(dt, [f"%r{4 * j + k}" for k in range(4)], acc))
        body.extend(f"add.f32 {x}, {x}, {a};" for x, a in zip(s, acc))
        body.extend(_pack_regs(dt, s, w))
        emit("add.u64 %a, %outp, %off;")
        emit(f"st.global.v4.b32 [%a], {vec};")
        body.extend(_unpack_regs(dt, w, xn))
        body.extend(f"fma.rn.f32 %ss, {x}, {x}, %ss;" for x in xn)
        emit(f"SUMMED{j}:")
    # 3. the row's sum of squares: warp butterfly, then the 8 warps' partials through shared
    for m in (16, 8, 4, 2, 1):
        emit(f"shfl.sync.bfly.b32 %fr, %ss, {m}, 0x1f, 0xffffffff;")
        emit("add.f32 %ss, %ss, %fr;")
    emit("and.b32 %lane, %th, 31;")
    emit("shr.u32 %warp, %th, 5;")
    emit("setp.eq.u32 %p, %lane, 0;")
    emit("mul.wide.u32 %off, %warp, 4;")
    emit(f"mov.u64 %a, {name}_red;")
    emit("add.u64 %a, %a, %off;")
    emit("@%p st.shared.f32 [%a], %ss;")
    emit("bar.sync 0;")
    emit("@!%is0 bra RSTD_DONE;")
    emit(f"ld.shared.f32 %ss, [{name}_red];")
    for k in range(1, THREADS // 32):
        emit(f"ld.shared.f32 %fr, [{name}_red+{4 * k}];")
        emit("add.f32 %ss, %ss, %fr;")
    emit(f"div.rn.f32 %ss, %ss, {_f32(float(dim))};")
    emit(f"add.f32 %ss, %ss, {_f32(eps)};")
    emit("rsqrt.approx.f32 %ss, %ss;")
    emit(f"st.shared.f32 [{name}_rstd], %ss;")
    emit("RSTD_DONE:")
    emit("bar.sync 0;")
    emit(f"ld.shared.f32 %rstd, [{name}_rstd];")
    # 4. h = (x_new * rstd, rounded) * scale, rounded
    for j in range(per_thread):
        xn = [f"%xn{j * n + k}" for k in range(n)]
        emit(f"@!%pv{j} bra NORMED{j};")
        locate(j)
        body.extend(f"mul.f32 {x}, {v}, %rstd;" for x, v in zip(s, xn))
        body.extend(_round_regs(dt, s, w, s))
        body.extend(_unpack_regs(dt, [f"%c{4 * j + k}" for k in range(4)], acc))
        body.extend(f"mul.f32 {x}, {x}, {a};" for x, a in zip(s, acc))
        body.extend(_pack_regs(dt, s, w))
        emit("add.u64 %a, %outhp, %off;")
        emit(f"st.global.v4.b32 [%a], {vec};")
        emit(f"NORMED{j}:")
    emit("@%is0 st.global.u32 [%cnt], %seq;")
    emit("ret;")
    shared = [f".shared .align 4 .u32 {name}_seq;",
              f".shared .align 4 .f32 {name}_red[{THREADS // 32}];",
              f".shared .align 4 .f32 {name}_rstd;"]
    return _entry(name, arch, dt, tp, "all-reduce + residual add + RMSNorm", shared,
                  ["p_x", "p_rank", "p_rows", "p_res", "p_scale", "p_out", "p_outh"], [],
                  body)


def _load_partials(emit: Any, partials: tuple[int, int], dim: int, n: int, j: int) -> None:
    """Issues the loads of the vector at byte %off of a [T, dim] array of the dtype from each of
    the S float32 partials (x float32 [S, T, dim] at %xp) into %pp registers of vector j."""
    num, rows = partials
    emit(f"mul.lo.u64 %b, %off, {4 * n // 16};")  # the same elements' bytes in float32
    emit("add.u64 %b, %b, %xp;")
    for s_ in range(num):
        for half in range(n // 4):  # 16-byte float32 loads
            base = (j * num + s_) * n + 4 * half
            regs = ", ".join(f"%pp{base + k}" for k in range(4))
            emit(f"ld.global.v4.f32 {{{regs}}}, [%b+{s_ * rows * dim * 4 + 16 * half}];")


def _add_partials(emit: Any, body: list[str], dt: str, partials: tuple[int, int], n: int,
                  j: int) -> None:
    """Into %w0..3: the float32 sum over s of vector j's partials (`_load_partials`), in order,
    rounded to the dtype."""
    for s_ in range(partials[0]):
        op = "mov.f32 {a}, {p};" if s_ == 0 else "add.f32 {a}, {a}, {p};"
        body.extend(op.format(a=f"%acc{k}", p=f"%pp{(j * partials[0] + s_) * n + k}")
                    for k in range(n))
    body.extend(_pack(dt))
