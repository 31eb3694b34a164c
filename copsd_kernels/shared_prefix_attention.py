"""Triton kernels: cascade (shared-prefix) attention forward.

Two launches of one flash-attention style kernel, then one log-sum-exp merge:

* prefix part -- every query row of every sequence against the single shared prefix K/V, one
  non-causal problem per KV head whose M dimension is ``B * S * G`` rows (G = Hq / Hkv query heads
  per KV head), so the tiles are large and the prefix K/V is read once per row block;
* suffix part -- per (sequence, KV head), the sequence's own tokens, causal, keys past
  ``seq_lens[b]`` masked; the G query heads of a KV head are packed into the rows of one tile;
* merge -- ``copsd_kernels.merge_attention_states``.

Query rows are numbered ``r = (b * S + s) * G + g`` in both parts (the suffix part starts at
``b * S * G``), which maps to query head ``hk * G + g``.  Scores use base 2 inside the kernel
(``exp2``, scale multiplied by log2(e)); the stored LSE is natural log with the scale folded in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from copsd_kernels import interpreting
from copsd_kernels.merge_attention_states import merge_attention_states as _merge

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_ptr, v_ptr, key_base, hk, HKV, s, lo, hi, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Online-softmax update over keys [lo, hi).  MASKED=False only for full blocks every row may see."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_off = key_base + (cols.to(tl.int64) * HKV + hk) * D
        if MASKED:
            cmask = cols < hi
            k = tl.load(k_ptr + kv_off[None, :] + d[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        else:
            k = tl.load(k_ptr + kv_off[None, :] + d[:, None], mask=dmask[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = qk * qk_scale
        if MASKED:
            valid = cmask[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= s[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p, v, input_precision="ieee")
        elif DOT_F32:
            acc += tl.dot(p, v)
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lens_ptr,
    qk_scale,  # scale * log2(e)
    n_rows,  # rows handled per program column: S * G (causal) or B * S * G (prefix)
    S, HQ, HKV, N_KEYS,
    G: tl.constexpr, D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if CAUSAL:  # grid (B * Hkv, row blocks): B * Hkv may exceed grid dim 1's limit of 65535
        pid_m = tl.program_id(1)
        pid_h = tl.program_id(0)
    else:  # grid (row blocks, Hkv)
        pid_m = tl.program_id(0)
        pid_h = tl.program_id(1)
    if CAUSAL:  # one program column per (sequence, KV head)
        seq = pid_h // HKV
        hk = pid_h % HKV
        row_base = seq.to(tl.int64) * S * G
        key_base = seq.to(tl.int64) * S * HKV * D
    else:  # one program column per KV head, rows span all sequences
        seq = 0
        hk = pid_h
        row_base = 0
        key_base = 0

    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < n_rows
    rows = row_base + local.to(tl.int64)
    g = rows % G
    bs = rows // G  # b * S + s
    s = bs % S
    b = bs // S
    hq = hk * G + g
    if HAS_LENS:
        row_len = tl.load(lens_ptr + b, mask=rmask, other=0)
        row_ok = rmask & (s < row_len)
    else:
        row_ok = rmask

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_off = (bs * HQ + hq) * D
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # keys < first_s are visible to every row of the block; [lo, hi) needs the causal mask.  Keys at
        # >= seq_len are never loaded; valid rows (s < seq_len) see only keys <= s anyway.
        if HAS_LENS:
            seq_len = tl.load(lens_ptr + seq)
        else:
            seq_len = S
        first_s = (pid_m * BLOCK_M) // G
        last_s = (pid_m * BLOCK_M + BLOCK_M - 1) // G
        hi = tl.minimum(last_s + 1, seq_len)
        lo = (tl.minimum(first_s, hi) // BLOCK_N) * BLOCK_N
    else:
        hi = N_KEYS
        lo = (N_KEYS // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptr, v_ptr, key_base, hk, HKV, s, 0, lo, qk_scale,
                                False, CAUSAL, DOT_F32, IEEE, BLOCK_N, BLOCK_D, D)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptr, v_ptr, key_base, hk, HKV, s, lo, hi, qk_scale,
                                True, CAUSAL, DOT_F32, IEEE, BLOCK_N, BLOCK_D, D)

    nonempty = row_ok & (l_i > 0.0)
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    o_off = (bs * HQ + hq) * D
    tl.store(o_ptr + o_off[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + (b * HQ + hq) * S + s, lse, mask=rmask)


def _config(d, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim d; one config (no autotune)."""
    if interpreting():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        # exact fp32 (IEEE) dots run on the FMA units and hold whole fp32 tiles in registers: these are the
        # sm_90 configs without register spills (benchmarks/triton_sm90.py); the earlier 4-warp configs
        # spilled 0.9-10 KiB per thread
        if d <= 64:
            return 64, 32, 8, 2
        return (32, 16, 8, 2) if d <= 128 else (16, 16, 8, 1)
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def _launch(q, k, v, o, lse, lens, scale, n_keys, causal):
    b, s, hq, d = q.shape
    hkv = k.shape[-2]
    g = hq // hkv
    block_m, block_n, warps, stages = _config(d, q.dtype)
    block_d = max(16, triton.next_power_of_2(d))
    if causal:
        n_rows = s * g
        grid = (b * hkv, triton.cdiv(n_rows, block_m))
    else:
        n_rows = b * s * g
        grid = (triton.cdiv(n_rows, block_m), hkv)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, lens if lens is not None else q,
        scale * _LOG2E, n_rows, s, hq, hkv, n_keys, G=g, D=d,
        CAUSAL=causal, HAS_LENS=lens is not None, DOT_F32=interpreting(), IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )


def shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    """Cascade attention forward.  Contiguous fp16/bf16/fp32 inputs (validated by ``copsd.ops``).

    Returns ``(o [B, S, Hq, D] in q.dtype, lse [B, Hq, S] float32)``.
    """
    b, s, hq, d = q.shape
    p_len = prefix_k.shape[0]
    lens = None if seq_lens is None else seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    if p_len == 0:
        o = torch.empty_like(q)
        lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
        _launch(q, k, v, o, lse, lens, scale, 0, causal=True)
        return o, lse
    o_p = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse_p = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    _launch(q, prefix_k, prefix_v, o_p, lse_p, lens, scale, p_len, causal=False)
    o_s = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse_s = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    _launch(q, k, v, o_s, lse_s, lens, scale, 0, causal=True)
    return _merge(o_p, lse_p, o_s, lse_s, out_dtype=q.dtype)
