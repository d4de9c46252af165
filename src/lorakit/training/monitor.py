"""What a run shows while it trains and leaves behind: a progress bar on a terminal
(plain log lines otherwise), ``metrics.jsonl``, and at the end ``loss.png``.

``metrics.jsonl`` has one JSON object per logged step (``{"step", "loss", "lr",
"grad_norm", "tokens_per_second", ...}``) or evaluation (``{"step", "eval_loss"}``);
the trackers of ``--report-to`` (training/tracking.py) get the same records.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import write_text
from .tracking import metrics_of, open_trackers


class Monitor:
    """Progress and metrics of the main process (``enabled``); the others stay silent."""

    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, log_every: int,
                 report_to: tuple[str, ...] = (), settings: dict[str, Any] | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.log_every = log_every
        self.total_steps = total_steps
        self.progress = None
        self.trackers = []
        if not enabled:
            return
        # A resumed run drops what the killed one logged after its last checkpoint:
        # those steps run again. So does the final evaluation, which follows the
        # last checkpoint.
        logged = read_metrics(self.path)
        kept = [r for r in logged if r["step"] <= start_step and not (is_evaluation(r) and r["step"] == total_steps)]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # The trackers already hold what the killed run logged: they get only later steps.
        self.sent = {kind: max((r["step"] for r in logged if is_evaluation(r) == (kind == "eval")), default=-1)
                     for kind in ("train", "eval")}
        self.trackers = open_trackers(report_to, out, settings or {}, fresh=not logged)
        self.file = self.path.open("a")
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def record(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if entry["step"] > self.sent["eval" if is_evaluation(entry) else "train"]:
            for tracker in self.trackers:
                tracker.log(metrics_of(entry), entry["step"])

    def step(self, entry: dict[str, Any]) -> None:
        step = entry["step"]
        if step % self.log_every and step != self.total_steps:
            return
        self.record(entry)
        rate = (f"{entry['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in entry
                else f"{entry['images_per_second']:,.1f} img/s" if "images_per_second" in entry
                else f"{entry['pairs_per_second']:,.1f} pairs/s")
        info = f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {rate}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif self.enabled:
            print(f"step {step}/{self.total_steps}  {info}", flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            (self.progress.console.print if self.progress else print)(text)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Held-out metrics (``eval_loss``, ``eval_rewards/accuracies``, ...) at ``step``."""
        self.record({"step": step, **metrics, "time": time.time()})
        shown = ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in metrics.items())
        self.note(f"eval at step {step}: {shown}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.enabled:
            self.file.close()
            for tracker in self.trackers:
                tracker.close()


def is_evaluation(entry: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl record holds held-out metrics (its keys start with ``eval_``)."""
    return any(key.startswith("eval_") for key in entry)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics file. A last line without its newline is
    one still being written, or one a kill cut short: it is left out, so a reader
    beside a live run and a resume after SIGKILL both see whole records only."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def plot_loss(metrics: Path, picture: Path, ylabel: str = "cross-entropy per trained token") -> None:
    """Train and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if held_out:
        axes.plot(*zip(*held_out), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    temporary = picture.with_name(f".{picture.name}.tmp-{os.getpid()}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    temporary.replace(picture)
