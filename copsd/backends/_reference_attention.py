"""Reference (pure PyTorch) cascade-attention ops.

Attention state of a query over a key subset: ``(o, lse)`` with ``lse = log sum_j exp(scale * q.k_j)``
(natural log, scale folded in, flash-attn layout ``o [B, S, H, D]``, ``lse [B, H, S]``).  Two states
over disjoint key subsets merge by log-sum-exp; an empty subset is ``(0, -inf)``.

``shared_prefix_attention`` is computed the cascade way: all queries of all sequences against the one
shared prefix (a single non-causal problem per KV head), each sequence against its own tokens causally,
then one merge.  Forward-only CPU calls run each part through PyTorch's blocked CPU flash kernel
(which returns the LSE); otherwise (autograd, other devices) both parts are chunked here so that no
score block holds more than ``_BLOCK_ELEMS`` elements, whatever the prefix length, written out of
place so autograd works through it.

The backward of both ops is written out here too (``merge_attention_states_backward``,
``shared_prefix_attention_backward``): the public ops are ``torch.library`` custom ops, whose
implementations run below autograd, so their registered autograd calls these explicit formulas
(FlashAttention's: ``P = exp(scale q.k - lse)``, ``dS = P (dP - rowsum(dO * O) + dlse)``), chunked
like the forward.
"""

from __future__ import annotations

import torch

# Largest score block materialised at once (elements).  2**22 fp32 = 16 MiB.
_BLOCK_ELEMS = 1 << 22
_KEY_BLOCK = 1024


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(o_a, lse_a, o_b, lse_b):
    """Merge in the accumulation dtype; ``o`` [..., S, H, D], ``lse`` [..., H, S]."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a = torch.exp(lse_a - m_safe)  # exp(-inf) = 0; both -inf -> both weights 0
    w_b = torch.exp(lse_b - m_safe)
    tot = w_a + w_b
    lse = torch.where(tot > 0, m_safe + torch.log(tot), torch.full_like(m, float("-inf")))
    inv = torch.where(tot > 0, 1.0 / tot, torch.zeros_like(tot))
    # weights are [..., H, S]; o is [..., S, H, D]
    wa = (w_a * inv).transpose(-1, -2).unsqueeze(-1)
    wb = (w_b * inv).transpose(-1, -2).unsqueeze(-1)
    return wa * o_a + wb * o_b, lse


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    acc = _acc_dtype(o_a.dtype)
    o, lse = _merge(o_a.to(acc), lse_a.to(acc), o_b.to(acc), lse_b.to(acc))
    return o.to(o_a.dtype), lse.to(acc)


def _block_attention(q, k, v, scale, mask):
    """Dense attention on one block.

    q [..., M, D], k/v [..., N, D] (accumulation dtype), mask broadcastable to [..., M, N] (True = attend)
    or None.  Returns o [..., M, D] and lse [..., M]; rows with nothing to attend give (0, -inf).
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(denom, float("-inf")))
    return o, lse.squeeze(-1)


def _merge_rows(o_a, lse_a, o_b, lse_b):
    """Merge states laid out as o [..., M, D], lse [..., M]."""
    o, lse = _merge(o_a.unsqueeze(-2), lse_a.unsqueeze(-2), o_b.unsqueeze(-2), lse_b.unsqueeze(-2))
    return o.squeeze(-2), lse.squeeze(-2)


def _prefix_part(qg, pk, pv, scale):
    """qg [Hkv, M, D] (all queries of all sequences of one KV head's group), pk/pv [Hkv, P, D]."""
    hkv, m_rows, _ = qg.shape
    p_len = pk.shape[1]
    kb = min(_KEY_BLOCK, p_len)
    rb = max(1, min(m_rows, _BLOCK_ELEMS // max(1, hkv * kb)))
    outs, lses = [], []
    for r0 in range(0, m_rows, rb):
        qr = qg[:, r0:r0 + rb]
        o = lse = None
        for k0 in range(0, p_len, kb):
            ob, lb = _block_attention(qr, pk[:, k0:k0 + kb], pv[:, k0:k0 + kb], scale, None)
            o, lse = (ob, lb) if o is None else _merge_rows(o, lse, ob, lb)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _suffix_part(qs, ks, vs, scale, key_valid):
    """Per-sequence causal attention.

    qs [B, Hkv, S, G, D], ks/vs [B, Hkv, S, D], key_valid [B, S] bool or None.
    Returns o [B, Hkv, S, G, D], lse [B, Hkv, S, G].
    """
    b, hkv, s_len, g, d = qs.shape
    rb = max(1, min(s_len, _BLOCK_ELEMS // max(1, b * hkv * g * s_len)))
    pos = torch.arange(s_len, device=qs.device)
    outs, lses = [], []
    for r0 in range(0, s_len, rb):
        r1 = min(s_len, r0 + rb)
        q_blk = qs[:, :, r0:r1].reshape(b, hkv, (r1 - r0) * g, d)
        causal = pos[None, :r1] <= pos[r0:r1, None]  # [rows, keys]
        causal = causal.repeat_interleave(g, dim=0)[None, None]  # [1, 1, rows*G, keys]
        mask = causal if key_valid is None else causal & key_valid[:, None, None, :r1]
        o, lse = _block_attention(q_blk, ks[:, :, :r1], vs[:, :, :r1], scale, mask)
        outs.append(o.reshape(b, hkv, r1 - r0, g, d))
        lses.append(lse.reshape(b, hkv, r1 - r0, g))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _cpu_flash():
    """PyTorch's blocked CPU attention kernel that also returns the (natural-log, scaled) LSE, if present."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fast_cpu_path(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    """Forward-only CPU path: the same cascade, each part through PyTorch's blocked flash kernel.

    Causal masking alone is enough for right padding in the own-token part: a valid query s < L only
    sees keys j <= s < L; padded query rows are overwritten at the end.
    """
    op = _cpu_flash()
    b, s_len, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    acc = _acc_dtype(q.dtype)  # fp32 in, so both partial outputs stay fp32 until the merge
    qs = q.to(acc)
    qh = qs.transpose(1, 2)  # [B, Hq, S, D]
    kh = k.to(acc).transpose(1, 2).repeat_interleave(g, dim=1)
    vh = v.to(acc).transpose(1, 2).repeat_interleave(g, dim=1)
    o, lse = op(qh, kh, vh, 0.0, True, scale=scale)  # [B, Hq, S, D], [B, Hq, S]
    p_len = prefix_k.shape[0]
    if p_len > 0:
        # One non-causal problem per KV head: rows (b, s, g) of all sequences against the one prefix.
        qp = qs.reshape(b, s_len, hkv, g, d).permute(2, 0, 1, 3, 4).reshape(1, hkv, b * s_len * g, d)
        pk = prefix_k.to(acc).permute(1, 0, 2).unsqueeze(0)
        pv = prefix_v.to(acc).permute(1, 0, 2).unsqueeze(0)
        op_, lp = op(qp, pk, pv, 0.0, False, scale=scale)
        op_ = op_.reshape(hkv, b, s_len, g, d).permute(1, 0, 3, 2, 4).reshape(b, hq, s_len, d)
        lp = lp.reshape(hkv, b, s_len, g).permute(1, 0, 3, 2).reshape(b, hq, s_len)
        o, lse = _merge_rows(o, lse.to(acc), op_, lp.to(acc))
    if seq_lens is not None:
        row_ok = (torch.arange(s_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None])[:, None]
        o = torch.where(row_ok[..., None], o, torch.zeros_like(o))
        lse = torch.where(row_ok, lse, torch.full_like(lse, float("-inf")))
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse.to(acc).contiguous()


# Use PyTorch's CPU flash kernel for forward-only CPU calls (tests switch it off to cover the chunked path).
USE_CPU_FLASH = True


def shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    if USE_CPU_FLASH and q.device.type == "cpu" and not needs_grad and _cpu_flash() is not None:
        return _fast_cpu_path(q, k, v, prefix_k, prefix_v, scale, seq_lens)
    return _chunked(q, k, v, prefix_k, prefix_v, scale, seq_lens)


def _chunked(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    b, s_len, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    p_len = prefix_k.shape[0]
    acc = _acc_dtype(q.dtype)

    # [B, S, Hq, D] -> [B, Hkv, S, G, D]: query head h belongs to KV head h // G.
    qs = q.to(acc).reshape(b, s_len, hkv, g, d).permute(0, 2, 1, 3, 4)
    ks = k.to(acc).permute(0, 2, 1, 3)
    vs = v.to(acc).permute(0, 2, 1, 3)
    key_valid = None
    if seq_lens is not None:
        key_valid = torch.arange(s_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]

    o, lse = _suffix_part(qs, ks, vs, scale, key_valid)  # [B, Hkv, S, G, D], [B, Hkv, S, G]

    if p_len > 0:
        # One non-causal problem per KV head over every query row of every sequence.
        qg = qs.permute(1, 0, 2, 3, 4).reshape(hkv, b * s_len * g, d)
        pk = prefix_k.to(acc).permute(1, 0, 2)
        pv = prefix_v.to(acc).permute(1, 0, 2)
        op, lp = _prefix_part(qg, pk, pv, scale)
        op = op.reshape(hkv, b, s_len, g, d).permute(1, 0, 2, 3, 4)
        lp = lp.reshape(hkv, b, s_len, g).permute(1, 0, 2, 3)
        o, lse = _merge_rows(o, lse, op, lp)

    if key_valid is not None:  # padded query rows: nothing attended
        row_ok = key_valid[:, None, :, None]
        o = torch.where(row_ok[..., None], o, torch.zeros_like(o))
        lse = torch.where(row_ok, lse, torch.full_like(lse, float("-inf")))

    o = o.permute(0, 2, 1, 3, 4).reshape(b, s_len, hq, d).to(q.dtype)
    lse = lse.permute(0, 1, 3, 2).reshape(b, hq, s_len)
    return o, lse


# ----------------------------------------------------------------------------- backward (explicit formulas)


def _weights(lse_x, lse):
    """``exp(lse_x - lse)``, 0 where the merged row is empty (``lse = -inf``) or ``lse_x = -inf``."""
    ok = torch.isfinite(lse)
    return torch.where(ok, torch.exp(lse_x - torch.where(ok, lse, torch.zeros_like(lse))), torch.zeros_like(lse))


def merge_attention_states_backward(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse):
    """Gradients of ``merge_attention_states`` given the merged ``lse`` and the output gradients.

    ``o = w_a o_a + w_b o_b`` with ``w_x = exp(lse_x - lse)``, ``lse = logaddexp(lse_a, lse_b)``:
    ``d o_x = w_x g_o`` and ``d lse_x = w_x (g_lse + <g_o, o_x - o>)`` (the sum over the head dim).
    An empty row (both sides ``-inf``) gets zero gradients.  Returns ``(d_o_a, d_lse_a, d_o_b, d_lse_b)``.
    """
    acc = _acc_dtype(o_a.dtype)
    lse_acc = lse.to(acc)
    w_a, w_b = _weights(lse_a.to(acc), lse_acc), _weights(lse_b.to(acc), lse_acc)  # [B, H, S]
    oa, ob, go = o_a.to(acc), o_b.to(acc), g_o.to(acc)
    wa, wb = w_a.transpose(1, 2).unsqueeze(-1), w_b.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    o = wa * oa + wb * ob  # the merged output in the accumulation dtype
    gl = g_lse.to(acc)
    d_lse_a = w_a * (gl + (go * (oa - o)).sum(-1).transpose(1, 2))
    d_lse_b = w_b * (gl + (go * (ob - o)).sum(-1).transpose(1, 2))
    return (wa * go).to(o_a.dtype), d_lse_a.to(lse_a.dtype), (wb * go).to(o_b.dtype), d_lse_b.to(lse_b.dtype)


def _block_grads(q, k, v, g_o, lse, delta, scale, mask):
    """One block of the attention backward (accumulation dtype): ``q``/``g_o`` [..., M, D], ``k``/``v``
    [..., N, D], ``lse``/``delta`` [..., M] (``lse = +inf`` for rows that attend nothing), ``mask``
    broadcastable to [..., M, N] or None.  Returns ``(dq [..., M, D], dk [..., N, D], dv [..., N, D])``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.unsqueeze(-1))
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    dp = torch.matmul(g_o, v.transpose(-1, -2))
    ds = p * (dp - delta.unsqueeze(-1))
    return (torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale,
            torch.matmul(p.transpose(-1, -2), g_o))


def shared_prefix_attention_backward(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse):
    """Gradients of ``shared_prefix_attention`` with respect to ``q, k, v, prefix_k, prefix_v``.

    ``o`` / ``lse`` are the forward's outputs, ``g_o`` / ``g_lse`` their gradients.  With
    ``P_ij = exp(scale q_i.k_j - lse_i)`` over the keys query ``i`` attends (the whole prefix and its own
    keys ``0..i`` below ``seq_lens``): ``dP_ij = g_o_i.v_j``, ``dS_ij = P_ij (dP_ij - <g_o_i, o_i> + g_lse_i)``,
    ``dq_i = scale sum_j dS_ij k_j``, ``dk_j = scale sum_i dS_ij q_i``, ``dv_j = sum_i P_ij g_o_i`` (summed over
    the query heads of a KV head, and over the sequences for the shared prefix).  Padded query rows
    (``lse = -inf``) contribute nothing.  Chunked with the forward's block sizes.
    """
    b, s_len, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    p_len = prefix_k.shape[0]
    acc = _acc_dtype(q.dtype)

    def heads(t):  # [B, S, Hq, D] -> [B, Hkv, S, G, D]
        return t.to(acc).reshape(b, s_len, hkv, g, d).permute(0, 2, 1, 3, 4)

    qs, gos = heads(q), heads(g_o)
    ks, vs = k.to(acc).permute(0, 2, 1, 3), v.to(acc).permute(0, 2, 1, 3)  # [B, Hkv, S, D]
    lse_ = lse.to(acc).reshape(b, hkv, g, s_len).permute(0, 1, 3, 2)  # [B, Hkv, S, G]
    lse_ = torch.where(torch.isfinite(lse_), lse_, torch.full_like(lse_, float("inf")))  # P = 0 there
    delta = (gos * heads(o)).sum(-1) - g_lse.to(acc).reshape(b, hkv, g, s_len).permute(0, 1, 3, 2)
    delta = torch.where(torch.isfinite(lse_), delta, torch.zeros_like(delta))
    key_valid = None
    if seq_lens is not None:
        key_valid = torch.arange(s_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]

    dq = torch.zeros_like(qs)
    dk, dv = torch.zeros_like(ks), torch.zeros_like(vs)
    # own tokens, causal: query rows in blocks, each against keys 0..r1
    rb = max(1, min(s_len, _BLOCK_ELEMS // max(1, b * hkv * g * s_len)))
    pos = torch.arange(s_len, device=q.device)
    for r0 in range(0, s_len, rb):
        r1 = min(s_len, r0 + rb)
        rows = (r1 - r0) * g
        causal = (pos[None, :r1] <= pos[r0:r1, None]).repeat_interleave(g, dim=0)[None, None]
        mask = causal if key_valid is None else causal & key_valid[:, None, None, :r1]
        dq_b, dk_b, dv_b = _block_grads(qs[:, :, r0:r1].reshape(b, hkv, rows, d), ks[:, :, :r1], vs[:, :, :r1],
                                        gos[:, :, r0:r1].reshape(b, hkv, rows, d),
                                        lse_[:, :, r0:r1].reshape(b, hkv, rows),
                                        delta[:, :, r0:r1].reshape(b, hkv, rows), scale, mask)
        dq[:, :, r0:r1] += dq_b.reshape(b, hkv, r1 - r0, g, d)
        dk[:, :, :r1] += dk_b
        dv[:, :, :r1] += dv_b
    dpk = torch.zeros(hkv, p_len, d, dtype=acc, device=q.device)
    dpv = torch.zeros_like(dpk)
    if p_len > 0:
        # the shared prefix: every query row of every sequence of a KV head's group, in blocks of rows and keys
        def rows_of(t):  # [B, Hkv, S, G, ...] -> [Hkv, B*S*G, ...]
            return t.permute(1, 0, 2, 3, *range(4, t.dim())).reshape(hkv, b * s_len * g, *t.shape[4:])

        qg, gg, lg, dg = rows_of(qs), rows_of(gos), rows_of(lse_), rows_of(delta)
        pk, pv = prefix_k.to(acc).permute(1, 0, 2), prefix_v.to(acc).permute(1, 0, 2)  # [Hkv, P, D]
        dqg = torch.zeros_like(qg)
        m_rows = qg.shape[1]
        kb = min(_KEY_BLOCK, p_len)
        rb = max(1, min(m_rows, _BLOCK_ELEMS // max(1, hkv * kb)))
        for r0 in range(0, m_rows, rb):
            for k0 in range(0, p_len, kb):
                dq_b, dk_b, dv_b = _block_grads(qg[:, r0:r0 + rb], pk[:, k0:k0 + kb], pv[:, k0:k0 + kb],
                                                gg[:, r0:r0 + rb], lg[:, r0:r0 + rb], dg[:, r0:r0 + rb], scale,
                                                None)
                dqg[:, r0:r0 + rb] += dq_b
                dpk[:, k0:k0 + kb] += dk_b
                dpv[:, k0:k0 + kb] += dv_b
        dq += dqg.reshape(hkv, b, s_len, g, d).permute(1, 0, 2, 3, 4)
    dq = dq.permute(0, 2, 1, 3, 4).reshape(b, s_len, hq, d).to(q.dtype)
    return (dq, dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype),
            dpk.permute(1, 0, 2).to(prefix_k.dtype), dpv.permute(1, 0, 2).to(prefix_v.dtype))
