"""Rank-0 run logging: console (progress bar on a terminal, plain lines otherwise), metrics.jsonl, TensorBoard.

    log = RunLogger(run_dir, cfg.log, enabled=rank == 0, total_steps=cfg.max_steps, start_step=step)
    log.info("resumed from ...")
    log.metrics(step, {"loss": 2.1, "lr_new": 1e-4, ...})   # one JSON line + TB scalars + console
    log.close()

``RUN/metrics.jsonl`` holds one JSON object per logged step (``{"step": N, "time": unix, ...}``);
scalars also go to TensorBoard under ``RUN/tb/`` with the same names. Other ranks get a no-op logger.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ptrain.configs import LogConfig

# Keys shown on the console line, in order, with their format.
_CONSOLE = (
    ("loss", "loss {:.4f}"),
    ("lr_new", "lr {:.2e}"),
    ("logit_scale", "scale {:.1f}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("samples_per_s", "{:.1f} samples/s"),
    ("frames_per_s", "{:.0f} frames/s"),
    ("data_wait", "data {:.0%}"),
    ("mfu", "MFU {:.1%}"),
)


class RunLogger:
    def __init__(self, run_dir: str | Path, cfg: LogConfig, *, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._purge_step: int | None = None
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def forget_after(self, step: int) -> None:
        """Drop what an earlier, crashed attempt logged after ``step`` (the checkpoint this run resumes
        from), so that every step appears once in metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the crash
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._jsonl = open(path, "a", buffering=1)
        self._purge_step = step + 1  # TensorBoard: events at later steps of older files are hidden

    def _tensorboard(self):
        if self._tb is None and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=self._purge_step)
        return self._tb

    def step_done(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def metrics(self, step: int, values: dict[str, Any], *, prefix: str = "train") -> None:
        """Record ``values`` at ``step`` (non-numbers go to the JSON line only)."""
        if not self.enabled:
            return
        clean = {k: v for k, v in values.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), "kind": prefix, **clean}) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    tb.add_scalar(f"{prefix}/{k}", v, step)
        shown = dict(clean)
        if "lr_new" not in shown and "lr_clip" in shown:  # meanP has no new parameters: show CLIP's rate
            shown["lr_new"] = shown["lr_clip"]
        parts = [fmt.format(shown[k]) for k, fmt in _CONSOLE if isinstance(shown.get(k), (int, float))]
        if prefix == "train":
            line = " | ".join(parts)
            if self._bar is not None:
                self._bar.set_postfix_str(line, refresh=False)
            else:
                self.info(f"step {step} | {line}")
        else:
            shown = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
            self.info(f"{prefix} @ step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
