"""An independent float64 NumPy reference for attention: explicit loops over batch,
head and query row, written from the definitions and sharing no code with jattn.

Every feature is spelled out here from its definition:
  allowed(b, n, t, s) = mask[b, n, t, s] and causal and window and lengths and
                        segments and prefix and mask_fn(t, s)
  score = scale * <q[b,t,n], k[b,s,n//G]> + bias[b,n,t,s];  score = score_fn(score, n, t, s)
  score = cap * tanh(score / cap);  weights = softmax over allowed s (zeros if none)
  weights *= keep / (1 - rate);     out[b,t,n] = sum_s weights * v[b,s,n//G]
"""

from __future__ import annotations

import numpy as np


def _per_example(x, B):
    if x is None:
        return [None] * B
    x = np.asarray(x)
    return [x] * B if x.ndim == 0 else list(x)


def reference_attention(
    q, k, v, *, bias=None, mask=None, scale=None, is_causal=False, q_lengths=None,
    kv_lengths=None, window=None, q_segments=None, kv_segments=None, query_offset=0,
    prefix_length=None, softcap=None, score_fn=None, mask_fn=None, dropout_keep=None,
    dropout_rate=0.0,
):
    """Returns ``(out [B, T, N, Hv], weights [B, N, T, S], lse [B, T, N])`` in float64.

    q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, Hv]``; bias / mask / dropout_keep
    broadcastable to ``[B, N, T, S]``; window = (left, right); query_offset int or [B].
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    _, S, K, Hv = v.shape
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (B, N, T, S))
    mask = None if mask is None else np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
    keep = None if dropout_keep is None else np.broadcast_to(np.asarray(dropout_keep, bool), (B, N, T, S))
    offsets = _per_example(query_offset, B)
    q_lens, kv_lens = _per_example(q_lengths, B), _per_example(kv_lengths, B)
    prefixes = _per_example(prefix_length, B)
    q_segs = [None] * B if q_segments is None else list(np.asarray(q_segments))
    kv_segs = [None] * B if kv_segments is None else list(np.asarray(kv_segments))

    out = np.zeros((B, T, N, Hv))
    weights = np.zeros((B, N, T, S))
    lse = np.full((B, T, N), -np.inf)
    s_pos = np.arange(S)
    for b in range(B):
        for n in range(N):
            kvh = n // G
            for t in range(T):
                pos = t + int(offsets[b])
                allowed = np.ones(S, bool)
                if mask is not None:
                    allowed &= mask[b, n, t]
                if is_causal:
                    allowed &= s_pos <= pos
                if window is not None:
                    left, right = window
                    allowed &= (s_pos >= pos - left) & (s_pos <= pos + right)
                if q_lens[b] is not None and t >= q_lens[b]:
                    allowed[:] = False
                if kv_lens[b] is not None:
                    allowed &= s_pos < kv_lens[b]
                if q_segs[b] is not None:
                    allowed &= kv_segs[b] == q_segs[b][t]
                if prefixes[b] is not None:
                    allowed &= (s_pos <= pos) | (s_pos < prefixes[b])
                if mask_fn is not None:
                    allowed &= np.array([bool(mask_fn(t, s)) for s in range(S)])
                score = scale * (k[b, :, kvh, :] @ q[b, t, n, :])
                if bias is not None:
                    score = score + bias[b, n, t]
                if score_fn is not None:
                    score = np.array([score_fn(score[s], n, t, s) for s in range(S)], np.float64)
                if softcap is not None:
                    score = softcap * np.tanh(score / softcap)
                if not allowed.any():
                    continue
                m = score[allowed].max()
                e = np.where(allowed, np.exp(score - m), 0.0)
                w = e / e.sum()
                lse[b, t, n] = m + np.log(e.sum())
                if keep is not None:
                    w = np.where(keep[b, n, t], w / (1.0 - dropout_rate), 0.0)
                weights[b, n, t] = w
                out[b, t, n] = w @ v[b, :, kvh, :]
    return out, weights, lse
