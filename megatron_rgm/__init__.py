"""megatron-rgm: one LLM that is both the policy and its process reward model, on megatron-core."""

__version__ = "0.1.0"
