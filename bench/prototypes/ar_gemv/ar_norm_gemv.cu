// Prototype (session 18): the tensor-parallel all-reduce + residual add + RMSNorm fused with the
// skinny GEMM that consumes its output, so the GEMM's weight streams into shared memory while
// the all-reduce waits on NVLink.
//
// One launch computes, for the real token rows t < rows (bf16; T <= 16 rows in all):
//   s[t]        = round(sum over ranks r, in rank order, of round(sum_j partials_r[j, t]))
//   x_new[t]    = round(residual[t] + s[t])                                   -> out_x
//   h[t]        = round(round(x_new[t] * rsqrt(mean(x_new[t]^2) + eps)) * scale)
//   parts[c, t] = sum over k in split c of h[t, k] * W[k, :]   (float32)      -> out_parts
// where W = [w0 | w1 | w2] side by side ([D, n0 + n1 + n2], each row-major). That is
// sharding/all_reduce.py's add_rms_norm followed by pallas_kernels/skinny_gemm.py on the q/k/v
// weights, with the split-K partials in `nsplit` uneven K slices (multiples of 16).
//
// Grid: (n0 + n1 + n2) / NT column blocks x nsplit K slices, one CTA of 256 threads per SM (the
// whole K x NT weight tile of a CTA sits in shared memory). Warps 0-3 copy the tile with cp.async
// as soon as the CTA starts, in waves of WAVE_ROWS rows with WAVES_IN_FLIGHT pending (so the
// GPU reads a narrow band of rows at a time: issuing everything at once streamed at 0.85 TB/s).
// Meanwhile warps 4-7 of CTA t < rows run row t's all-reduce (NCCL's LL protocol as in
// sharding/all_reduce_ptx.py: 8-byte {data, flag} halves pushed into each peer's inbox; every
// load issued first, all lines polled together) and publish h[t] in their own GPU's workspace
// (LL lines again), and warps 4-7 of every CTA gather h[t, k0:k1] of their K slice into shared
// memory. Then all 8 warps multiply (float32 FMA on CUDA cores).
//
// Measurement-only variants (build.sh): DEBUG_STAMPS (per-CTA %globaltimer stamps after the
// workspace's HAREA), NO_LOAD (no weight loads), GATE_MODE 1/2 (the loads wait for the row CTAs'
// pushes / their h), LOAD_DELAY_NS. Results: README.md here.
//
// Workspace (per device, zeroed once): u32 call counter at 0, u32 done counter at 4;
// INBOX at 4096: [16 rows][2 slots][TP sources][16 KiB LL]; HAREA after it: [16 rows][2 slots]
// [16 KiB LL]. The call counter is the flag value (every rank makes the same calls); the CTA
// that finishes last increments it (all CTAs have read it by then). Slots alternate by its
// parity; a slot is rewritten only after the peer has read it (as in all_reduce.py).
//
// Build: bench/prototypes/ar_gemv/build.sh (nvcc -ptx; the PTX is not committed: carry it).
// Counter words 16..31 of the workspace hold the GATE_MODE flags (one per row).

#include <cuda_bf16.h>
#include <stdint.h>

#define THREADS 256
#define NT 256             // output columns per CTA
#define KT_MAX 384         // K rows per CTA (smem: KT_MAX * NT * 2 bytes)
#define T_MAX 16           // token rows
#define SP_MAX 4           // split-K partials of the producing GEMM
#ifndef WAVE_ROWS
#define WAVE_ROWS 32       // tile rows per cp.async commit group
#endif
#ifndef NO_LOAD
#define NO_LOAD 0          // 1 (measurement only): no weight loads, the product of stale smem
#endif
#ifndef GATE_MODE
#define GATE_MODE 0        // the loads wait for: 0 nothing, 1 the row CTAs' pushes, 2 their h
#endif
#ifndef LOAD_DELAY_NS
#define LOAD_DELAY_NS 0    // the loaders start this long after the CTA
#endif
#ifndef WAVES_IN_FLIGHT
#define WAVES_IN_FLIGHT 4  // commit groups a loader thread keeps pending
#endif
#define LL_BYTES 16384     // one row of up to 4096 bf16 in LL form
#define INBOX_OFF 4096
#define TIMEOUT_NS 10000000000ull
#ifndef GATHER_MODE
#define GATHER_MODE 1  // 0: every thread spins on its h lines; 1: one thread waits (with backoff)
#endif
#ifndef DEBUG_STAMPS
#define DEBUG_STAMPS 0  // 1: per-CTA %globaltimer stamps into the workspace (after HAREA)
#endif
#ifndef SUFFIX
#define SUFFIX
#endif
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#if DEBUG_STAMPS
#define STAMP(i) dbg[i] = globaltimer()
#else
#define STAMP(i)
#endif

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void st_ll(uint64_t addr, uint32_t d0, uint32_t d1, uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(addr), "r"(d0), "r"(flag), "r"(d1), "r"(flag) : "memory");
}

// Polls the 16-byte LL line at addr until both halves carry `flag`; returns its two data words.
__device__ __forceinline__ void ld_ll(uint64_t addr, uint32_t flag, uint32_t& d0, uint32_t& d1) {
  uint64_t start = 0;
  while (true) {
    uint32_t a, fa, b, fb;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a), "=r"(fa), "=r"(b), "=r"(fb) : "l"(addr) : "memory");
    if (fa == flag && fb == flag) { d0 = a; d1 = b; return; }
    uint64_t now = globaltimer();
    if (start == 0) start = now;
    else if (now - start > TIMEOUT_NS) asm volatile("trap;");
  }
}

__device__ __forceinline__ uint32_t ld_volatile_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_volatile_u32(uint32_t* p, uint32_t v) {
  asm volatile("st.volatile.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// One 16-byte LL line, no waiting: {d0, f0, d1, f1}.
__device__ __forceinline__ void ld_line(uint64_t addr, uint32_t& d0, uint32_t& f0, uint32_t& d1,
                                        uint32_t& f1) {
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(d0), "=r"(f0), "=r"(d1), "=r"(f1) : "l"(addr) : "memory");
}

__device__ __forceinline__ uint32_t ld_cg_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float round_bf(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_named(int id, int count) {
  asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}

// K slice [k0, k1) of split c of D (boundaries multiples of 16).
__device__ __forceinline__ void k_slice(uint32_t c, uint32_t nsplit, uint32_t D, uint32_t& k0,
                                        uint32_t& k1) {
  k0 = (uint32_t)(((uint64_t)c * D / nsplit) & ~15ull);
  k1 = c + 1 == nsplit ? D : (uint32_t)(((uint64_t)(c + 1) * D / nsplit) & ~15ull);
}

// out_parts[split, t, cb * NT + c] = sum over the tile's rows r of h[t, r] * tile[r, c], for the
// real rows t < rows (R: rows rounded up to a power of two). Thread (phase = tid / 32, lane)
// owns columns lane * 8 .. + 8 of rows phase, phase + 8, ...; the 8 phases are summed through
// shared memory (the tile's space, free by then) in phase order.
template <int R>
__device__ __forceinline__ void product(const __nv_bfloat16* tile, const float* hs, uint32_t kt,
                                        uint32_t rows, float* out_parts, uint32_t split,
                                        uint32_t T, uint32_t N, uint32_t cb) {
  const uint32_t tid = threadIdx.x, phase = tid / 32, lane = tid % 32;
  float acc[R][8];
#pragma unroll
  for (int t = 0; t < R; ++t)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[t][c] = 0.f;
  uint32_t r = phase;
  for (; r + 24 < kt; r += 32) {  // 4 rows per step, their loads first
    uint4 wv[4];
    float hv[4][R];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      wv[u] = reinterpret_cast<const uint4*>(tile + (r + 8 * u) * NT)[lane];
#pragma unroll
      for (int t = 0; t < R; ++t) hv[u][t] = hs[t * KT_MAX + r + 8 * u];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w[8] = {bf_lo(wv[u].x), bf_hi(wv[u].x), bf_lo(wv[u].y), bf_hi(wv[u].y),
                          bf_lo(wv[u].z), bf_hi(wv[u].z), bf_lo(wv[u].w), bf_hi(wv[u].w)};
#pragma unroll
      for (int t = 0; t < R; ++t)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[t][c] = fmaf(hv[u][t], w[c], acc[t][c]);
    }
  }
  for (; r < kt; r += 8) {
    const uint4 wv = reinterpret_cast<const uint4*>(tile + r * NT)[lane];
    const float w[8] = {bf_lo(wv.x), bf_hi(wv.x), bf_lo(wv.y), bf_hi(wv.y),
                        bf_lo(wv.z), bf_hi(wv.z), bf_lo(wv.w), bf_hi(wv.w)};
#pragma unroll
    for (int t = 0; t < R; ++t) {
      const float hv = hs[t * KT_MAX + r];
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[t][c] = fmaf(hv, w[c], acc[t][c]);
    }
  }
  __syncthreads();  // every thread is done with the tile: reuse it for the phases' sums
  float* scratch = reinterpret_cast<float*>(const_cast<__nv_bfloat16*>(tile));  // [8][R][NT]
#pragma unroll
  for (int t = 0; t < R; ++t) {
    float4* dst = reinterpret_cast<float4*>(scratch + (phase * R + t) * NT + lane * 8);
    dst[0] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
    dst[1] = make_float4(acc[t][4], acc[t][5], acc[t][6], acc[t][7]);
  }
  __syncthreads();
  for (uint32_t t = 0; t < rows; ++t) {  // thread tid: column tid, the 8 phases in order
    float sum = scratch[t * NT + tid];
#pragma unroll
    for (int p = 1; p < 8; ++p) sum += scratch[(p * R + t) * NT + tid];
    out_parts[((uint64_t)split * T + t) * N + cb * NT + tid] = sum;
  }
}

// The last CTA to finish advances the call counter (every CTA has read it by then): one thread
// per CTA, after the CTA's stores.
__device__ __forceinline__ void finish_call(uint32_t* counters) {
  __threadfence();
  const uint32_t done = atomicAdd(counters + 1, 1u);
  if (done == gridDim.x - 1) {
    counters[1] = 0;
    __threadfence();
    atomicAdd(counters, 1u);
  }
}

// Warps 4-7 (at = threadIdx.x - 128) of the CTA that owns token row `row`: the row's all-reduce
// (LL protocol: pushes into each peer's inbox, this GPU's inbox polled), the residual add
// (stored to out_x) and the RMSNorm, whose h is published as LL lines in this GPU's HAREA.
template <int TP>
__device__ __forceinline__ void row_all_reduce(
    const float* __restrict__ partials, const uint32_t* __restrict__ residual,
    const uint32_t* __restrict__ scale, uint32_t* out_x, const uint64_t* ws, int rank,
    uint64_t own, uint64_t harea, uint32_t seq, uint32_t slot, uint32_t row, uint32_t sp,
    uint32_t T, uint32_t D, uint32_t eps_bits, float* red, float* rstd_s) {
  const uint32_t at = threadIdx.x - 128;
  const uint32_t nvec = D / 8;
    // ---- warps 4-7 of CTA `row`: the all-reduce of the row, then its norm, published as LL.
    // Every load that does not wait for a peer is issued first (their latencies overlap).
    float4 pp[4][SP_MAX][2];
    uint4 res[4], sc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t v = at + j * 128;
      if (v < nvec) {
#pragma unroll
        for (int p = 0; p < SP_MAX; ++p) {
          if (p < (int)sp) {
            const float4* src = reinterpret_cast<const float4*>(
                partials + ((uint64_t)p * T + row) * D + v * 8);
            pp[j][p][0] = src[0];
            pp[j][p][1] = src[1];
          }
        }
        res[j] = reinterpret_cast<const uint4*>(residual + (uint64_t)row * D / 2)[v];
        sc[j] = reinterpret_cast<const uint4*>(scale)[v];
      }
    }
    uint32_t own_v[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t v = at + j * 128;
      if (v < nvec) {
        float acc[8] = {pp[j][0][0].x, pp[j][0][0].y, pp[j][0][0].z, pp[j][0][0].w,
                        pp[j][0][1].x, pp[j][0][1].y, pp[j][0][1].z, pp[j][0][1].w};
#pragma unroll
        for (int p = 1; p < SP_MAX; ++p) {
          if (p < (int)sp) {
            acc[0] += pp[j][p][0].x; acc[1] += pp[j][p][0].y;
            acc[2] += pp[j][p][0].z; acc[3] += pp[j][p][0].w;
            acc[4] += pp[j][p][1].x; acc[5] += pp[j][p][1].y;
            acc[6] += pp[j][p][1].z; acc[7] += pp[j][p][1].w;
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) own_v[j][q] = pack_bf2(acc[2 * q], acc[2 * q + 1]);
      }
    }
    // push to every peer: inbox block (row, slot, source = rank)
#pragma unroll
    for (int r = 0; r < TP; ++r) {
      if (r == rank) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t v = at + j * 128;
        if (v < nvec) {
          const uint64_t dst = ws[r] + INBOX_OFF +
                               (((uint64_t)row * 2 + slot) * TP + rank) * LL_BYTES + v * 32;
          st_ll(dst, own_v[j][0], own_v[j][1], seq);
          st_ll(dst + 16, own_v[j][2], own_v[j][3], seq);
        }
      }
    }
#if GATE_MODE == 1
    if (at == 0) st_volatile_u32(reinterpret_cast<uint32_t*>(own) + 16 + row, seq);
#endif
    // the sum in rank order; each peer's lines are loaded together and re-polled together
    float acc[4][8];
#pragma unroll
    for (int r = 0; r < TP; ++r) {
      uint32_t d[4][4];
      if (r == rank) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) d[j][q] = own_v[j][q];
      } else {
        const uint64_t base = own + INBOX_OFF +
                              (((uint64_t)row * 2 + slot) * TP + r) * LL_BYTES;
        uint64_t start = 0;
        while (true) {
          bool ok = true;
          uint32_t f[4][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t v = at + j * 128;
            if (v < nvec) {
              ld_line(base + v * 32, d[j][0], f[j][0], d[j][1], f[j][1]);
              ld_line(base + v * 32 + 16, d[j][2], f[j][2], d[j][3], f[j][3]);
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t v = at + j * 128;
            if (v < nvec)
              ok &= f[j][0] == seq && f[j][1] == seq && f[j][2] == seq && f[j][3] == seq;
          }
          if (ok) break;
          const uint64_t now = globaltimer();
          if (start == 0) start = now;
          else if (now - start > TIMEOUT_NS) asm volatile("trap;");
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (r == 0) { acc[j][2 * q] = bf_lo(d[j][q]); acc[j][2 * q + 1] = bf_hi(d[j][q]); }
          else { acc[j][2 * q] += bf_lo(d[j][q]); acc[j][2 * q + 1] += bf_hi(d[j][q]); }
        }
    }
    float xn[4][8];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t v = at + j * 128;
      if (v < nvec) {
        const uint32_t rw[4] = {res[j].x, res[j].y, res[j].z, res[j].w};
        uint32_t o[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float a = round_bf(acc[j][2 * q]) + bf_lo(rw[q]);
          const float b = round_bf(acc[j][2 * q + 1]) + bf_hi(rw[q]);
          o[q] = pack_bf2(a, b);
          xn[j][2 * q] = bf_lo(o[q]);
          xn[j][2 * q + 1] = bf_hi(o[q]);
          ss = fmaf(xn[j][2 * q], xn[j][2 * q], ss);
          ss = fmaf(xn[j][2 * q + 1], xn[j][2 * q + 1], ss);
        }
        reinterpret_cast<uint4*>(out_x + (uint64_t)row * D / 2)[v] =
            make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
    // the row's sum of squares over warps 4-7
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, m);
    if ((at & 31) == 0) red[at >> 5] = ss;
    bar_named(1, 128);
    if (at == 0) {
      const float tot = red[0] + red[1] + red[2] + red[3];
      *rstd_s = rsqrtf(tot / (float)D + __uint_as_float(eps_bits));
    }
    bar_named(1, 128);
    const float rstd = *rstd_s;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t v = at + j * 128;
      if (v < nvec) {
        const uint32_t sw[4] = {sc[j].x, sc[j].y, sc[j].z, sc[j].w};
        uint32_t hv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float a = round_bf(xn[j][2 * q] * rstd) * bf_lo(sw[q]);
          const float b = round_bf(xn[j][2 * q + 1] * rstd) * bf_hi(sw[q]);
          hv[q] = pack_bf2(a, b);
        }
        const uint64_t dst = own + harea + ((uint64_t)row * 2 + slot) * LL_BYTES + v * 32;
        st_ll(dst, hv[0], hv[1], seq);
        st_ll(dst + 16, hv[2], hv[3], seq);
      }
    }
#if GATE_MODE == 2
    if (at == 0) st_volatile_u32(reinterpret_cast<uint32_t*>(own) + 16 + row, seq);
#endif
}

template <int TP>
__device__ void ar_norm_gemv(const float* __restrict__ partials, const int* __restrict__ rank_p,
                             const int* __restrict__ rows_p, const uint32_t* __restrict__ residual,
                             const uint32_t* __restrict__ scale, const __nv_bfloat16* w0,
                             const __nv_bfloat16* w1, const __nv_bfloat16* w2, uint32_t* out_x,
                             float* out_parts, const uint64_t* ws, uint32_t sp, uint32_t T,
                             uint32_t D, uint32_t n0, uint32_t n1, uint32_t n2, uint32_t nsplit,
                             uint32_t eps_bits) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem);           // [KT_MAX][NT]
  float* hs = reinterpret_cast<float*>(smem + KT_MAX * NT * 2);            // [T_MAX][KT_MAX]
  __shared__ float red[4];
  __shared__ float rstd_s;

  const uint32_t tid = threadIdx.x;
  const uint32_t N = n0 + n1 + n2;
  const uint32_t nblocks = N / NT;
  const uint32_t cb = blockIdx.x % nblocks, split = blockIdx.x / nblocks;
  uint32_t k0, k1;
  k_slice(split, nsplit, D, k0, k1);
  const uint32_t kt = k1 - k0;
  // this CTA's weight and its first column
  uint32_t col = cb * NT;
  const __nv_bfloat16* w = w0;
  uint32_t ldw = n0;
  if (col >= n0 + n1) { w = w2; ldw = n2; col -= n0 + n1; }
  else if (col >= n0) { w = w1; ldw = n1; col -= n0; }

  const int rank = *rank_p;
  const uint32_t rows = (uint32_t)*rows_p;
  const uint64_t own = ws[rank];
  uint32_t* counters = reinterpret_cast<uint32_t*>(own);
  const uint32_t seq = ld_cg_u32(counters) + 1;  // this call's flag (never 0)
  const uint32_t slot = seq & 1;
  const uint64_t harea = INBOX_OFF + (uint64_t)T_MAX * 2 * TP * LL_BYTES;
#if DEBUG_STAMPS
  uint64_t* dbg = reinterpret_cast<uint64_t*>(own + harea + (uint64_t)T_MAX * 2 * LL_BYTES) +
                  blockIdx.x * 8;
#endif
  if (tid == 0) { STAMP(0); }

  if (tid < 128) {
    // ---- warps 0-3: the weight tile [kt, NT] into shared memory, in waves of WAVE_ROWS rows
    //      with at most WAVES_IN_FLIGHT waves pending (the whole GPU then reads a narrow band
    //      of rows at a time, as a pipelined GEMM does)
    const uint32_t per_row = NT / 8;  // 16-byte chunks per row
    const uint32_t tile_base = (uint32_t)__cvta_generic_to_shared(tile);
#if GATE_MODE > 0
    if (rows > 0) {  // wait until the row CTAs have pushed (1) / published h (2)
      if (tid == 0) {
        const uint32_t* flags = counters + 16;
        const uint64_t t0 = globaltimer();
        for (uint32_t t = 0; t < rows; ++t) {
          while (ld_volatile_u32(flags + t) != seq) {
            __nanosleep(32);
            if (globaltimer() - t0 > TIMEOUT_NS) asm volatile("trap;");
          }
        }
      }
      bar_named(4, 128);
    }
#endif
#if LOAD_DELAY_NS > 0
    {  // let the all-reduce's loads and pushes go out before the weights flood the memory
      const uint64_t t0 = globaltimer();
      while (globaltimer() - t0 < LOAD_DELAY_NS) {}
    }
#endif
    const uint32_t waves = (kt + WAVE_ROWS - 1) / WAVE_ROWS;
    for (uint32_t wave = 0; wave < waves; ++wave) {
      const uint32_t r0 = wave * WAVE_ROWS;
      const uint32_t hi = NO_LOAD ? 0 : min(kt, r0 + WAVE_ROWS) * per_row;  // NO_LOAD: none
      for (uint32_t i = r0 * per_row + tid; i < hi; i += 128) {
        const uint32_t r = i / per_row, c = i % per_row;
        cp_async16(tile_base + (r * NT + c * 8) * 2, w + (uint64_t)(k0 + r) * ldw + col + c * 8);
      }
      cp_commit();
      if (wave + 1 >= WAVES_IN_FLIGHT) cp_wait<WAVES_IN_FLIGHT - 1>();
    }
    cp_wait<0>();
    if (tid == 0) { STAMP(1); }
  } else {
    const uint32_t at = tid - 128;  // 0..127
    const uint32_t nvec = D / 8;    // 16-byte vectors of a bf16 row
    const uint32_t row = blockIdx.x;
    if (row < rows) {
      row_all_reduce<TP>(partials, residual, scale, out_x, ws, rank, own, harea, seq, slot, row,
                         sp, T, D, eps_bits, red, &rstd_s);
      if (at == 0) { STAMP(2); }
    } else if (row < T) {
      // a padding row: x_new is zero there (as the unfused kernel stores)
      for (uint32_t v = at; v < nvec; v += 128)
        reinterpret_cast<uint4*>(out_x + (uint64_t)row * D / 2)[v] = make_uint4(0, 0, 0, 0);
    }
    // ---- warps 4-7 of every CTA: h[t, k0:k1] of the real rows into shared memory (f32)
    const uint32_t lines = kt / 4;  // 16-byte LL lines hold 4 bf16
    for (uint32_t t = 0; t < rows; ++t) {
#if GATHER_MODE == 1
      if (at == 0) {  // one thread waits for the slice's first line, then all read theirs
        const uint64_t first = own + harea + ((uint64_t)t * 2 + slot) * LL_BYTES +
                               (uint64_t)(k0 / 4) * 16;
        uint32_t d0, d1;
        uint64_t start = globaltimer();
        while (true) {
          uint32_t a, fa, b, fb;
          asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(a), "=r"(fa), "=r"(b), "=r"(fb) : "l"(first) : "memory");
          if (fa == seq && fb == seq) break;
          __nanosleep(64);
          if (globaltimer() - start > TIMEOUT_NS) asm volatile("trap;");
        }
        (void)d0; (void)d1;
      }
      bar_named(2, 128);
#endif
      for (uint32_t l = at; l < lines; l += 128) {
        uint32_t d0, d1;
        const uint64_t src = own + harea + ((uint64_t)t * 2 + slot) * LL_BYTES +
                             (uint64_t)(k0 / 4 + l) * 16;
        ld_ll(src, seq, d0, d1);
        float* dst = hs + t * KT_MAX + l * 4;
        dst[0] = bf_lo(d0); dst[1] = bf_hi(d0); dst[2] = bf_lo(d1); dst[3] = bf_hi(d1);
      }
    }
  }

  if (tid == 128) { STAMP(3); }
  __syncthreads();  // the tile and h of the real rows are in shared memory
  if (tid == 0) { STAMP(5); }
  // ---- all warps: the tile times h; thread = (row phase tid / 32, columns lane * 8 .. + 8)
  if (rows <= 1) product<1>(tile, hs, kt, rows, out_parts, split, T, N, cb);
  else if (rows <= 4) product<4>(tile, hs, kt, rows, out_parts, split, T, N, cb);
  else product<16>(tile, hs, kt, rows, out_parts, split, T, N, cb);
  if (tid == 0) {
    STAMP(6);
    finish_call(counters);
  }
}

#define ENTRY(BASE, TP, ...)                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) CAT(BASE##TP, SUFFIX)(              \
      const float* partials, const int* rank_p, const int* rows_p, const uint32_t* residual,   \
      const uint32_t* scale, const __nv_bfloat16* w0, const __nv_bfloat16* w1,                 \
      const __nv_bfloat16* w2, uint32_t* out_x, float* out_parts, __VA_ARGS__, uint32_t sp,    \
      uint32_t T, uint32_t D, uint32_t n0, uint32_t n1, uint32_t n2, uint32_t nsplit,         \
      uint32_t eps_bits)

ENTRY(xlaserve_ar_norm_gemv_tp, 2, uint64_t ws0, uint64_t ws1) {
  const uint64_t ws[2] = {ws0, ws1};
  ar_norm_gemv<2>(partials, rank_p, rows_p, residual, scale, w0, w1, w2, out_x, out_parts, ws,
                  sp, T, D, n0, n1, n2, nsplit, eps_bits);
}

// ============================================================================================
// Ring variant (gate/up after o_proj's all-reduce): the weight is too large for shared memory,
// so 132 persistent CTAs stream it through a ring of RING stages of RING_ROWS x NT (mbarriers:
// full = the stage's cp.async landed, empty = the product is done with it). CTA c owns the units
// [c * U / G, (c + 1) * U / G) of the (column block, 32-row chunk) units in block-major order, so
// a column block is shared by at most MAX_SLOTS CTAs: each writes its partial into slot
// (c - the block's first CTA) of out_parts [MAX_SLOTS, T, N]; the CTA that owns a block's last
// chunk zero-fills the slots after its own. The ring fills during the all-reduce (up to
// RING x 16 KiB per SM). Rows <= HROWS (h of the real rows in shared memory as bf16).

#define RING 12
#define RING_ROWS 32
#define STAGE_BYTES (RING_ROWS * NT * 2)
#define MAX_SLOTS 4
#define HROWS 4

__device__ __forceinline__ void mbar_init(uint32_t addr, uint32_t count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(addr), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t addr) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}" :: "r"(addr)
               : "memory");
}
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t addr) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" :: "r"(addr) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
  uint64_t start = 0;
  while (true) {
    uint32_t done;
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(addr), "r"(parity) : "memory");
    if (done) return;
    const uint64_t now = globaltimer();
    if (start == 0) start = now;
    else if (now - start > TIMEOUT_NS) asm volatile("trap;");
  }
}

__device__ __forceinline__ uint32_t unit_start(uint32_t c, uint32_t U, uint32_t G) {
  return (uint32_t)((uint64_t)c * U / G);
}

template <int R>
__device__ __forceinline__ void ring_consume(const __nv_bfloat16* ring, const __nv_bfloat16* hsm,
                                             uint32_t u0, uint32_t u1, uint32_t kw, uint32_t U,
                                             uint32_t rows, uint32_t T, uint32_t N,
                                             float* out_parts, uint32_t ring_base) {
  const uint32_t at = threadIdx.x - 128, G = gridDim.x, c = blockIdx.x;
  float acc[R][2];
#pragma unroll
  for (int t = 0; t < R; ++t) { acc[t][0] = 0.f; acc[t][1] = 0.f; }
  for (uint32_t i = 0; u0 + i < u1; ++i) {
    const uint32_t s = i % RING, lap = i / RING, u = u0 + i;
    const uint32_t b = u / kw, chunk = u % kw, k0 = chunk * RING_ROWS;
    mbar_wait(ring_base + RING * STAGE_BYTES + s * 8, lap & 1);  // full[s]
    const __nv_bfloat16* st = ring + (uint64_t)s * RING_ROWS * NT;
#pragma unroll 8
    for (uint32_t r = 0; r < RING_ROWS; ++r) {
      const uint32_t wv = reinterpret_cast<const uint32_t*>(st + r * NT)[at];
      const float wa = bf_lo(wv), wb = bf_hi(wv);
#pragma unroll
      for (int t = 0; t < R; ++t) {
        const float hv = __bfloat162float(hsm[t * 4096 + k0 + r]);
        acc[t][0] = fmaf(hv, wa, acc[t][0]);
        acc[t][1] = fmaf(hv, wb, acc[t][1]);
      }
    }
    mbar_arrive(ring_base + RING * STAGE_BYTES + (RING + s) * 8);  // empty[s]
    const bool block_ends = u + 1 == u1 || (u + 1) / kw != b;
    if (block_ends) {
      // this CTA's slot in block b: its index among the CTAs that own units of the block
      uint32_t c0 = (uint32_t)((uint64_t)b * kw * G / U);
      while (unit_start(c0 + 1, U, G) <= b * kw) ++c0;
      while (unit_start(c0, U, G) > b * kw) --c0;
      const uint32_t slot = c - c0;
      for (uint32_t t = 0; t < rows; ++t) {
        float2* dst = reinterpret_cast<float2*>(out_parts + ((uint64_t)slot * T + t) * N + b * NT);
        dst[at] = make_float2(acc[t < R ? t : 0][0], acc[t < R ? t : 0][1]);
        if (chunk == kw - 1)  // the block's last chunk: the slots after this one are unused
          for (uint32_t z = slot + 1; z < MAX_SLOTS; ++z)
            reinterpret_cast<float2*>(out_parts + ((uint64_t)z * T + t) * N + b * NT)[at] =
                make_float2(0.f, 0.f);
      }
#pragma unroll
      for (int t = 0; t < R; ++t) { acc[t][0] = 0.f; acc[t][1] = 0.f; }
    }
  }
}

template <int TP>
__device__ void ar_norm_gemv_ring(const float* __restrict__ partials,
                                  const int* __restrict__ rank_p, const int* __restrict__ rows_p,
                                  const uint32_t* __restrict__ residual,
                                  const uint32_t* __restrict__ scale, const __nv_bfloat16* w0,
                                  const __nv_bfloat16* w1, uint32_t* out_x, float* out_parts,
                                  const uint64_t* ws, uint32_t sp, uint32_t T, uint32_t D,
                                  uint32_t n0, uint32_t n1, uint32_t eps_bits) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem);  // [RING][RING_ROWS][NT]
  // mbarriers after the ring: full[RING], empty[RING]; then h [HROWS][4096] bf16
  __nv_bfloat16* hsm = reinterpret_cast<__nv_bfloat16*>(smem + RING * STAGE_BYTES + 2 * RING * 8);
  __shared__ float red[4];
  __shared__ float rstd_s;
  const uint32_t tid = threadIdx.x, G = gridDim.x, c = blockIdx.x;
  const uint32_t ring_base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t N = n0 + n1, kw = D / RING_ROWS, U = (N / NT) * kw;
  const uint32_t u0 = unit_start(c, U, G), u1 = unit_start(c + 1, U, G);
  const int rank = *rank_p;
  const uint32_t rows = (uint32_t)*rows_p;
  const uint64_t own = ws[rank];
  uint32_t* counters = reinterpret_cast<uint32_t*>(own);
  const uint32_t seq = ld_cg_u32(counters) + 1;
  const uint32_t slot = seq & 1;
  const uint64_t harea = INBOX_OFF + (uint64_t)T_MAX * 2 * TP * LL_BYTES;
#if DEBUG_STAMPS
  uint64_t* dbg = reinterpret_cast<uint64_t*>(own + harea + (uint64_t)T_MAX * 2 * LL_BYTES) +
                  blockIdx.x * 8;
#endif
  if (tid == 0) {
    STAMP(0);
    for (int s = 0; s < 2 * RING; ++s) mbar_init(ring_base + RING * STAGE_BYTES + s * 8, 128);
  }
  __syncthreads();
  if (tid < 128) {
    // ---- warps 0-3: stream the units through the ring
    const uint32_t per_row = NT / 8;
    for (uint32_t i = 0; u0 + i < u1; ++i) {
      const uint32_t s = i % RING, lap = i / RING, u = u0 + i;
      if (lap > 0) mbar_wait(ring_base + RING * STAGE_BYTES + (RING + s) * 8, (lap - 1) & 1);
      const uint32_t b = u / kw, k0 = (u % kw) * RING_ROWS;
      uint32_t col = b * NT;
      const __nv_bfloat16* w = w0;
      uint32_t ldw = n0;
      if (col >= n0) { w = w1; ldw = n1; col -= n0; }
      const uint32_t dst = ring_base + s * STAGE_BYTES;
      for (uint32_t idx = tid; idx < RING_ROWS * per_row; idx += 128) {
        const uint32_t r = idx / per_row, cc = idx % per_row;
        cp_async16(dst + (r * NT + cc * 8) * 2, w + (uint64_t)(k0 + r) * ldw + col + cc * 8);
      }
      cp_async_mbar_arrive(ring_base + RING * STAGE_BYTES + s * 8);
    }
    if (tid == 0) { STAMP(1); }
  } else {
    const uint32_t at = tid - 128;
    const uint32_t row = blockIdx.x;
    if (row < rows) {
      row_all_reduce<TP>(partials, residual, scale, out_x, ws, rank, own, harea, seq, slot, row,
                         sp, T, D, eps_bits, red, &rstd_s);
      if (at == 0) { STAMP(2); }
    } else if (row < T) {
      for (uint32_t v = at; v < D / 8; v += 128)
        reinterpret_cast<uint4*>(out_x + (uint64_t)row * D / 2)[v] = make_uint4(0, 0, 0, 0);
    }
    // h of the real rows for this CTA's K ranges into shared memory (bf16, by absolute k)
    const uint32_t first_k = (u0 % kw) * RING_ROWS;
    const bool spans = (u1 - 1) / kw != u0 / kw;  // the range wraps into the next block
    const uint32_t last_k = ((u1 - 1) % kw + 1) * RING_ROWS;
    for (uint32_t t = 0; t < rows; ++t) {
      const uint64_t base = own + harea + ((uint64_t)t * 2 + slot) * LL_BYTES;
      for (uint32_t l = at; l < D / 4; l += 128) {
        const uint32_t k = l * 4;
        const bool need = spans ? (k >= first_k || k < last_k) : (k >= first_k && k < last_k);
        if (!need) continue;
        uint32_t d0, d1;
        ld_ll(base + (uint64_t)l * 16, seq, d0, d1);
        uint32_t* dst = reinterpret_cast<uint32_t*>(hsm + t * 4096 + k);
        dst[0] = d0;
        dst[1] = d1;
      }
    }
    bar_named(1, 128);
    if (at == 0) { STAMP(3); }
    if (rows <= 1) ring_consume<1>(ring, hsm, u0, u1, kw, U, rows, T, N, out_parts, ring_base);
    else ring_consume<HROWS>(ring, hsm, u0, u1, kw, U, rows, T, N, out_parts, ring_base);
    if (tid == 128) {
      STAMP(6);
      finish_call(counters);
    }
  }
}

ENTRY(xlaserve_ar_norm_gemv_ring_tp, 2, uint64_t ws0, uint64_t ws1) {
  const uint64_t ws[2] = {ws0, ws1};
  ar_norm_gemv_ring<2>(partials, rank_p, rows_p, residual, scale, w0, w1, out_x, out_parts, ws,
                       sp, T, D, n0, n1, eps_bits);
}
