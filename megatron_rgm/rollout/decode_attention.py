"""KV-cache decoding through megatron-core's ``flash_decode`` path, with torch stand-ins for flash-attn.

megatron-core's static-batching KV cache (``StaticInferenceContext``) has two paths:

* default: keys are cached *before* the rotary embedding, so each decode step
  re-rotates every cached key of every layer (cos/sin recomputed over the whole
  history) and, with grouped-query attention, ``repeat_interleave``s the whole
  key and value cache to the query heads before a softmax(QK^T)V in separate
  ops: O(t) extra copies per layer and step, and most of the time of a decode
  step of a small model on the CPU;
* ``config.flash_decode``: a key is rotated once, before it is cached, with a
  cos/sin table computed once per forward, and a decode step's attention is
  one call of flash-attn's ``flash_attn_with_kvcache`` (the prefill's rotary
  is flash-attn's ``apply_rotary_emb``).

flash-attn needs CUDA. :func:`install` puts plain-torch versions of those two
functions into megatron-core's modules, only where flash-attn did not import
(megatron-core then leaves them ``None``; its own fallback for the rotary,
``apply_rotary_pos_emb_with_cos_sin`` without flash-attn, takes cos/sin for
angles and is wrong). The attention is ``scaled_dot_product_attention`` with
``enable_gqa`` (no repeated keys). :func:`flash_decode` turns the path on for
one model while a sampler runs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_INSTALLED: list[str] = []


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the first ``2 * cos.shape[-1]`` channels of ``x`` (cos/sin broadcast against ``x[..., :rot/2]``)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """flash-attn's ``apply_rotary_emb`` for ``x`` ``[b, s, h, d]``, ``cos``/``sin`` ``[seqlen_ro, rot/2]``."""
    if cu_seqlens is not None or not isinstance(seqlen_offsets, int):
        raise NotImplementedError("the torch apply_rotary_emb takes neither cu_seqlens nor per-sequence offsets")
    s = x.shape[1]
    cos = cos[seqlen_offsets:seqlen_offsets + s, None, :].to(x.dtype)
    sin = sin[seqlen_offsets:seqlen_offsets + s, None, :].to(x.dtype)
    out = _rotate(x, cos, sin, interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out


def _key(items) -> tuple | None:
    key = []
    for x in items:
        if torch.is_tensor(x):
            try:
                key.append((id(x), x._version))
            except RuntimeError:  # an inference-mode tensor has no version counter: do not memoise
                return None
        else:
            key.append(x)
    return tuple(key)


class _Memo:
    """One-entry memo keyed by tensor identity and version (an in-place change invalidates it).

    Every layer of one forward gets the same ``cache_seqlens`` and cos/sin tensors: the host read of the
    offset and the cos/sin row of the new position are done once a forward, not once a layer.
    """

    def __init__(self):
        self.key, self.refs, self.value = None, None, None

    def get(self, *items):
        key = _key(items)
        return self.value if key is not None and key == self.key else None

    def put(self, value, *items):
        # ``refs`` keeps the tensors alive, so that no other tensor can take their ids while memoised.
        self.key, self.refs, self.value = _key(items), items, value
        return value


_OFFSET, _ROW = _Memo(), _Memo()


def _uniform_offset(cache_seqlens: torch.Tensor) -> int | None:
    """The offset shared by every row (static batching), else None; one host read a forward."""
    hit = _OFFSET.get(cache_seqlens)
    if hit is not None:
        return hit[0]
    first = int(cache_seqlens[0])
    return _OFFSET.put((first if bool((cache_seqlens == first).all()) else None,), cache_seqlens)[0]


def _rotary_row(cos: torch.Tensor, sin: torch.Tensor, position: int, dtype: torch.dtype):
    """Full-width tables at one position so that ``rope(x) = x * C + roll(x, d/2) * S`` (non-interleaved)."""
    hit = _ROW.get(cos, sin, position, dtype)
    if hit is not None:
        return hit
    c, s_ = cos[position].to(dtype), sin[position].to(dtype)
    return _ROW.put((torch.cat((c, c)), torch.cat((-s_, s_))), cos, sin, position, dtype)


def _decode_static(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, offset, softmax_scale, interleaved):
    """One new token per row, every row at ``offset``: the sampler's decode step."""
    half = q.shape[-1] // 2
    if rotary_cos is not None:
        if not interleaved and 2 * rotary_cos.shape[-1] == q.shape[-1]:
            # x1*c - x2*s, x2*c + x1*s: the same products and sums as megatron's own rotary.
            c, s_ = _rotary_row(rotary_cos, rotary_sin, offset, q.dtype)
            q = q * c + q.roll(half, dims=-1) * s_
            k = k * c + k.roll(half, dims=-1) * s_
        else:
            cos, sin = rotary_cos[offset].to(q.dtype), rotary_sin[offset].to(q.dtype)
            q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    k_cache[:, offset:offset + 1] = k
    v_cache[:, offset:offset + 1] = v
    n = offset + 1
    keys, values = k_cache[:, :n].transpose(1, 2), v_cache[:, :n].transpose(1, 2)  # [b, hk, n, d]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, scale=softmax_scale,
                                         enable_gqa=keys.shape[1] != q.shape[2])
    return out.transpose(1, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache`` (dense cache; no paging, windows, soft-cap or ALiBi).

    ``q`` ``[b, sq, hq, d]``; caches ``[b, S, hk, d]`` (updated in place at
    ``cache_seqlens``); new ``k``/``v`` ``[b, sk, hk, d]`` are rotated (with
    ``q``) at their positions, written, and attended to with the ``cache_seqlens``
    keys before them. Returns ``[b, sq, hq, d]``.
    """
    if (cache_batch_idx is not None or cache_leftpad is not None or block_table is not None
            or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_softmax_lse):
        raise NotImplementedError("the torch flash_attn_with_kvcache supports a dense cache only")
    b, sq, hq, d = q.shape
    if cache_seqlens is None:
        cache_seqlens = 0
    if not torch.is_tensor(cache_seqlens):
        cache_seqlens = torch.full((b,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if k is not None and sq == 1 and k.shape[1] == 1 and q.device.type == "cpu":
        offset = _uniform_offset(cache_seqlens)
        if offset is not None:
            return _decode_static(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, offset, softmax_scale,
                                  rotary_interleaved)
    seqlens = cache_seqlens.to(torch.long)
    sk = 0 if k is None else k.shape[1]
    if k is not None:
        positions = seqlens[:, None] + torch.arange(sk, device=q.device)  # [b, sk]
        if rotary_cos is not None:
            cos, sin = rotary_cos.to(q.dtype), rotary_sin.to(q.dtype)
            # flash-attn: q at cache_seqlens (+ i when causal); new keys at their own positions.
            q_pos = positions[:, :sq] if causal else seqlens[:, None].expand(b, sq)
            q = _rotate(q, cos[q_pos][:, :, None], sin[q_pos][:, :, None], rotary_interleaved)
            k = _rotate(k, cos[positions][:, :, None], sin[positions][:, :, None], rotary_interleaved)
        rows = torch.arange(b, device=q.device)[:, None]
        k_cache[rows, positions] = k
        v_cache[rows, positions] = v
    lengths = seqlens + sk  # keys each row attends to
    # On the CPU attend to the filled part of the cache only; on a device, mask the rest (no host sync).
    n = int(lengths.max()) if q.device.type == "cpu" else k_cache.shape[1]
    keys, values = k_cache[:, :n].transpose(1, 2), v_cache[:, :n].transpose(1, 2)  # [b, hk, n, d]
    idx = torch.arange(n, device=q.device)
    if causal and sq > 1:
        q_idx = lengths[:, None] - sq + torch.arange(sq, device=q.device)  # [b, sq]
        mask = idx[None, None, :] <= q_idx[:, :, None]  # [b, sq, n]
    else:
        mask = (idx[None, :] < lengths[:, None])[:, None, :].expand(b, sq, n)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         scale=softmax_scale, enable_gqa=keys.shape[1] != hq)
    return out.transpose(1, 2)


def install() -> list[str]:
    """Give megatron-core the torch functions above where flash-attn is missing; returns what it set (idempotent)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    if rope_utils.apply_rotary_emb_flash is None:
        rope_utils.apply_rotary_emb_flash = apply_rotary_emb
        _INSTALLED.append("megatron.core.models.common.embeddings.rope_utils.apply_rotary_emb_flash")
    if attention.flash_attn_with_kvcache is None:
        attention.flash_attn_with_kvcache = flash_attn_with_kvcache
        _INSTALLED.append("megatron.core.transformer.attention.flash_attn_with_kvcache")
    return list(_INSTALLED)


def supported(model) -> bool:
    """Whether the flash-decode path computes what the default path does for this model.

    Not for what megatron's flash decode ignores (a custom softmax scale or
    softmax type, sliding windows, attention-output gates, layers without RoPE),
    multi-latent attention, or flash-attn's real kernels with fp32 weights (they
    take fp16/bf16 only).
    """
    from megatron.core.transformer import attention

    cfg = model.config
    if getattr(cfg, "multi_latent_attention", False) or getattr(cfg, "softmax_scale", None) is not None:
        return False
    if getattr(cfg, "attention_output_gate", False) or getattr(cfg, "no_rope_freq", None):
        return False
    if getattr(cfg, "window_size", None) is not None or getattr(cfg, "softmax_type", "vanilla") != "vanilla":
        return False
    if getattr(model, "position_embedding_type", "rope") not in ("rope", "learned_absolute", "none"):
        return False
    real_kernel = attention.flash_attn_with_kvcache not in (None, flash_attn_with_kvcache)
    if real_kernel and cfg.params_dtype not in (torch.float16, torch.bfloat16):
        return False
    return True


@contextlib.contextmanager
def flash_decode(model, enabled: bool = True):
    """Run ``model``'s KV-cache forwards through megatron-core's flash-decode path inside the block."""
    cfg = model.config
    before = cfg.flash_decode
    if enabled:
        install()
        cfg.flash_decode = True
    try:
        yield
    finally:
        cfg.flash_decode = before
