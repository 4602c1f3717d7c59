"""What a stage measures as it trains: metrics.jsonl (one JSON object per trainer log), the held-out
metrics before training (`FirstEvaluation`), and the loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from mistral_align.files import write_text_atomic


class MetricsJsonl(TrainerCallback):
    """Appends every trainer log (train loss, lr, eval loss, ...) to <run_dir>/metrics.jsonl, on the main process.

    `resume_step`: the step this launch of the stage starts from (0 for a fresh start). The stage's
    rows past it, logged by an earlier launch that was killed, are dropped; rows up to it are already
    in the file, so this launch does not log them again: no duplicated and no lost rows.
    """

    def __init__(self, path: str | Path, stage: str = "sft", resume_step: int | None = None, is_main: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.t0 = time.time()
        self.skip_upto = -1
        if resume_step is not None and is_main and self.path.exists():
            rows = read_metrics(self.path)
            kept = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= resume_step]
            if len(kept) != len(rows):
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            if any(r.get("stage") == stage for r in kept):
                self.skip_upto = resume_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or state.global_step <= self.skip_upto:
            return
        row = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self.t0, 2)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class FirstEvaluation(TrainerCallback):
    """Keeps the metrics of the trainer's first evaluation in this launch (`eval_on_start`: the held-out
    metrics before training) and hands them to `on_first` once (the stage records them in the manifest)."""

    def __init__(self, on_first=None):
        self.metrics: dict | None = None
        self.on_first = on_first

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is None and metrics is not None:
            self.metrics = dict(metrics)
            if self.on_first is not None:
                self.on_first(self.metrics)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, out_path: str | Path, title: str = "loss") -> Path | None:
    """Train (and eval) loss against step, one line per stage; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    if not any("loss" in r or "eval_loss" in r for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r.get("stage", "train") for r in rows):
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            pts = [(r["step"], r[key]) for r in rows if r.get("stage", "train") == stage and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{stage} {key.replace('_', ' ')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
