"""One tensor-parallel rank's shard of a Megatron tensor, read from the HF files slice by slice.

:func:`megatron_shard` returns exactly ``shard(megatron_tensor(name, ...), dim,
gated, rank, size)`` (:mod:`megatron_rgm.convert.mapping`,
:mod:`megatron_rgm.model.state`), but reads only the bytes of the rank's slice
and builds it in place: no full HF tensor, no concatenated copy.

* column-parallel (dim 0) weights: the rank's rows of each HF source are one
  contiguous byte range; QKV takes, per KV group of the rank, its query rows,
  then its key and value rows; FC1 takes the rank's rows of gate, then of up;
  the embedding and output layer take the rank's rows of the padded
  vocabulary (rows past the HF vocabulary are zeros);
* row-parallel (dim 1) weights: read a few whole rows at a time, keep the
  rank's columns;
* replicated tensors (norms, biases of replicated layers): read whole.

Anything else falls back to the full tensor (correct, not streamed).
"""

from __future__ import annotations

import torch

from megatron_rgm.convert.hf_io import HFCheckpoint
from megatron_rgm.convert.mapping import LAYER_NAME, SAME_NAMES, HFArch, megatron_tensor
from megatron_rgm.model.state import shard


def _chunk(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``torch.chunk(size)[rank]`` along a dimension of length n."""
    per = -(-n // size)
    start = min(n, rank * per)
    return start, min(n, start + per)


def _rows(hf: HFCheckpoint, src: str, a: int, b: int) -> torch.Tensor:
    shape = hf.shape(src)
    return hf.read_into(src, torch.empty(b - a, *shape[1:], dtype=hf.dtype(src)), rows=(a, b))


def megatron_shard(name: str, hf: HFCheckpoint, arch: HFArch, padded_vocab: int, dim: int | None, gated: bool,
                   rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of the full Megatron tensor ``name`` (global layer numbering), in the HF dtype.

    Args:
        name: full (TP=1, PP=1) Megatron name, as :func:`megatron_rgm.model.state.global_name` gives it.
        dim, gated: how tensor parallelism splits it (:func:`megatron_rgm.model.state.partition`).
        rank, size: tensor-parallel rank and world size.
    """
    if dim is None or size == 1:
        dim, rank, size = 0, 0, 1  # the whole tensor: one "slice" along dim 0
    if name in ("embedding.word_embeddings.weight", "output_layer.weight") and dim == 0:
        src = "lm_head.weight" if name == "output_layer.weight" and not arch.tied else "model.embed_tokens.weight"
        vocab, hidden = hf.shape(src)
        a, b = _chunk(padded_vocab, rank, size)
        out = torch.empty(b - a, hidden, dtype=hf.dtype(src))
        real = max(0, min(b, vocab) - a)
        if real:
            hf.read_into(src, out[:real], rows=(a, a + real))
        out[real:].zero_()
        return out
    if name == "decoder.final_layernorm.weight":
        return hf.get("model.norm.weight")
    m = LAYER_NAME.match(name)
    if m:
        p, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in SAME_NAMES:
            src = p + SAME_NAMES[rest]
            shape = hf.shape(src)
            if dim == 0:
                return _rows(hf, src, *_chunk(shape[0], rank, size))
            if dim == 1 and len(shape) == 2:
                c0, c1 = _chunk(shape[1], rank, size)
                return hf.read_into(src, torch.empty(shape[0], c1 - c0, dtype=hf.dtype(src)), cols=(c0, c1))
        if (rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias") and dim == 0
                and arch.num_kv_heads % size == 0):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = (f"{p}self_attn.{x}_proj.{kind}" for x in "qkv")
            groups, hd = arch.num_kv_heads, arch.head_dim
            per = arch.num_heads // groups
            g0, g1 = rank * groups // size, (rank + 1) * groups // size
            inner = hf.shape(q)[1:]
            step = (per + 2) * hd
            out = torch.empty((g1 - g0) * step, *inner, dtype=hf.dtype(q))
            for i, g in enumerate(range(g0, g1)):
                base = i * step
                hf.read_into(q, out[base:base + per * hd], rows=(g * per * hd, (g + 1) * per * hd))
                hf.read_into(k, out[base + per * hd:base + (per + 1) * hd], rows=(g * hd, (g + 1) * hd))
                hf.read_into(v, out[base + (per + 1) * hd:base + step], rows=(g * hd, (g + 1) * hd))
            return out
        if rest == "mlp.linear_fc1.weight" and dim == 0 and (gated or size == 1):
            gate, up = p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"
            ffn, hidden = hf.shape(gate)
            a, b = _chunk(ffn, rank, size)
            out = torch.empty(2 * (b - a), hidden, dtype=hf.dtype(gate))
            hf.read_into(gate, out[: b - a], rows=(a, b))
            hf.read_into(up, out[b - a:], rows=(a, b))
            return out

    def expert(src: str, e: int) -> torch.Tensor:  # one expert of a fused [experts, ...] tensor
        return _rows(hf, src, e, e + 1)[0]

    return shard(megatron_tensor(name, hf.get, arch, padded_vocab, expert), dim, gated, rank, size).clone()
