"""Iteration logs on the last rank (Megatron-LM's habit): a stdout line, tensorboard, wandb, a JSON-lines file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_rgm import lazy

# Printed in this order on the iteration line; everything else goes to tensorboard / wandb / the file only.
_LINE_KEYS = ("lr", "sprm lr", "grpo loss", "lm loss", "spr loss", "kl", "entropy", "grad norm", "sprm grad norm",
              "reward", "accuracy", "response length", "score correct", "score incorrect", "rollout kl", "tokens/s")


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key.endswith("lr") or "loss" in key or key in ("kl",):
            return f"{key}: {value:.6E}"
        return f"{key}: {value:.4f}" if abs(value) < 1e4 else f"{key}: {value:.1f}"
    return f"{key}: {value}"


class MetricsLogger:
    """Writes each iteration's metrics where the run asked (only on the rank that logs)."""

    def __init__(self, active: bool, train_iters: int, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None, metrics_file: str | None = None, run_config: dict | None = None):
        self.active, self.train_iters = active, train_iters
        self.tb = self.wandb = None
        self.file = None
        if not active:
            return
        if tensorboard_dir:
            self.tb = lazy.load("torch.utils.tensorboard", "--tensorboard-dir").SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        if wandb_project:
            self.wandb = lazy.load("wandb", "--wandb-project").init(project=wandb_project, config=run_config or {})
        if metrics_file:
            path = Path(metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")
            if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                self.file.write("\n")  # a killed run's last line was cut: start on a fresh line

    def log(self, iteration: int, metrics: dict[str, float], times: dict[str, float]) -> None:
        if not self.active:
            return
        shown = [_fmt(k, metrics[k]) for k in _LINE_KEYS if k in metrics and not _nan(metrics[k])]
        split = " / ".join(f"{k} {v * 1000:.0f}" for k, v in times.items())
        print(f" iteration {iteration:8d}/{self.train_iters:8d} | " + " | ".join(shown)
              + f" | time (ms) {split}", flush=True)
        if self.tb is not None:
            for k, v in {**metrics, **{f"time/{k}": t for k, t in times.items()}}.items():
                if not _nan(v):
                    self.tb.add_scalar(k.replace(" ", "_"), v, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**metrics, **{f"time/{k}": t for k, t in times.items()}}, step=iteration)
        if self.file is not None:
            self.file.write(json.dumps({"iteration": iteration, **metrics,
                                        **{f"time/{k}": t for k, t in times.items()}}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
