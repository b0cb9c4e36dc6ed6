"""Test-only helpers: hand-built StepInputs over permuted pages, a dense attention, greedy loop.

The real scheduler, batch builder and engine belong to other modules; these helpers are small,
explicit stand-ins so the model tests do not depend on them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama


@dataclasses.dataclass
class PagedSeq:
    """One sequence's pages (in order) and how many tokens are already in the cache."""

    pages: list[int]
    cached: int = 0


def permuted_pages(rng: np.random.RandomState, num_pages: int,
                   counts: list[int]) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) page lists; page 0 (padding) is never handed out."""
    perm = rng.permutation(np.arange(1, num_pages))
    out, i = [], 0
    for c in counts:
        out.append([int(p) for p in perm[i:i + c]])
        i += c
    if i > num_pages - 1:
        raise ValueError(f"num_pages={num_pages} too small for {counts}")
    return out


def build_step(seqs: list[PagedSeq], new_tokens: list[list[int]], *, page_size: int,
               t_pad: int, s_pad: int, max_pages: int) -> StepInputs:
    """StepInputs for one step in which seqs[i] gets new_tokens[i]; updates each seq's `cached`.

    Padding token rows write to page 0; padded sequences have zero lengths.
    """
    tok, pos, slots, cu, kv, logit_idx = [], [], [], [0], [], []
    table = np.zeros((s_pad, max_pages), np.int32)
    for s, (seq, new) in enumerate(zip(seqs, new_tokens, strict=True)):
        for j, t in enumerate(new):
            p = seq.cached + j
            tok.append(t)
            pos.append(p)
            slots.append(seq.pages[p // page_size] * page_size + p % page_size)
        seq.cached += len(new)
        cu.append(cu[-1] + len(new))
        kv.append(seq.cached)
        logit_idx.append(cu[-1] - 1)
        table[s, :len(seq.pages)] = seq.pages
    n_real = len(tok)
    if n_real > t_pad or len(seqs) > s_pad:
        raise ValueError(f"t_pad={t_pad}/s_pad={s_pad} too small for {n_real} tokens, "
                         f"{len(seqs)} seqs")
    pad_t = t_pad - n_real
    pad_s = s_pad - len(seqs)
    i32 = functools.partial(np.asarray, dtype=np.int32)
    return StepInputs(
        token_ids=i32(tok + [0] * pad_t), positions=i32(pos + [0] * pad_t),
        slot_mapping=i32(slots + [0] * pad_t),
        cu_q_lens=i32(cu + [cu[-1]] * pad_s), kv_lens=i32(kv + [0] * pad_s), page_table=table,
        num_seqs=i32([len(seqs)]), logits_indices=i32(logit_idx + [0] * pad_s))


def dense_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_pages: jax.Array,
                    v_pages: jax.Array, inputs: StepInputs, *, sm_scale: float,
                    sliding_window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AttentionFn for ONE whole sequence given at once: plain causal softmax attention.

    Ignores the pages (returned unchanged); the mask comes from the token positions only.
    """
    t, n, h = q.shape
    g = n // k_new.shape[1]
    k = jnp.repeat(k_new, g, axis=1).astype(jnp.float32)  # [T, N, H]
    v = jnp.repeat(v_new, g, axis=1).astype(jnp.float32)
    pos = inputs.positions
    mask = pos[None, :] <= pos[:, None]  # [Tq, Tk]
    if sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - sliding_window
    s = jnp.einsum("qnh,knh->nqk", q.astype(jnp.float32), k) * sm_scale
    s = jnp.where(mask[None], s, -jnp.inf)
    o = jnp.einsum("nqk,knh->qnh", jax.nn.softmax(s, axis=-1), v)
    return o.astype(q.dtype), k_pages, v_pages


def dense_hidden(params: llama.Params, cfg: ModelConfig, tokens: list[int]) -> jax.Array:
    """Final-normed hidden states [T, D] of one sequence through dense causal attention."""
    return _dense_hidden_jit(params, cfg, np.asarray(tokens, np.int32))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dense_hidden_jit(params: llama.Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[0]
    i32 = functools.partial(np.asarray, dtype=np.int32)
    inputs = StepInputs(token_ids=tokens, positions=i32(range(t)), slot_mapping=i32([0] * t),
                        cu_q_lens=i32([0, t]), kv_lens=i32([t]), page_table=i32([[0]]),
                        num_seqs=i32([1]), logits_indices=i32([t - 1]))
    cache = llama.init_kv_cache(cfg, 1, 1)
    hidden, _ = llama.forward_hidden(params, inputs, cache, cfg, attention_fn=dense_attention)
    return hidden


@functools.partial(jax.jit, static_argnames=("cfg",))
def jit_forward(params: llama.Params, inputs: StepInputs, cache: llama.KVCache,
                cfg: ModelConfig) -> tuple[jax.Array, llama.KVCache]:
    return llama.forward(params, inputs, cache, cfg, attention_impl="reference")


@functools.partial(jax.jit, static_argnames=("cfg",))
def jit_forward_hidden(params: llama.Params, inputs: StepInputs, cache: llama.KVCache,
                       cfg: ModelConfig) -> tuple[jax.Array, llama.KVCache]:
    return llama.forward_hidden(params, inputs, cache, cfg, attention_impl="reference")


def greedy_generate(params: llama.Params, cfg: ModelConfig, prompt: list[int], num_tokens: int,
                    *, page_size: int = 8, seed: int = 0) -> list[int]:
    """Greedy decoding through the paged cache: one prefill step, then one token per step."""
    total = len(prompt) + num_tokens
    max_pages = -(-total // page_size)
    num_pages = 2 * max_pages + 1
    rng = np.random.RandomState(seed)
    seq = PagedSeq(permuted_pages(rng, num_pages, [max_pages])[0])
    cache = llama.init_kv_cache(cfg, num_pages, page_size)
    out: list[int] = []
    new = list(prompt)
    t_pad = max(16, len(prompt))
    for _ in range(num_tokens):
        inputs = build_step([seq], [new], page_size=page_size, t_pad=t_pad, s_pad=1,
                            max_pages=max_pages)
        logits, cache = jit_forward(params, inputs, cache, cfg)
        nxt = int(np.argmax(np.asarray(logits[0])))
        out.append(nxt)
        new = [nxt]
    return out
