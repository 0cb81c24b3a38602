"""Training: the GRPO + SPR loop, its optimizer, the head's first-iteration calibration, and iteration logs."""
