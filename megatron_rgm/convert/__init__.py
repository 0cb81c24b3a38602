"""HF <-> Megatron checkpoint conversion (Qwen2, Qwen3, Llama) with the SPRM head."""

from megatron_rgm.convert.convert import hf_to_mcore, mcore_to_hf
from megatron_rgm.convert.mapping import HFArch

__all__ = ["hf_to_mcore", "mcore_to_hf", "HFArch"]
