"""Training infrastructure: checkpointing (the GRPO + SPR loop lands here too)."""
