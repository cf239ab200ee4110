"""What the user sees: rich progress bars and tables, and the metrics.jsonl log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from esskit.files import write_atomic

console = Console()


def info(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        console.print(f"[bold cyan]esskit[/] {message}")


def json_safe(value):
    """NaN/inf -> None so that the files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def scalars(result: dict) -> dict:
    """The summary metrics of an evaluation (no per-class lists)."""
    return {k: v for k, v in result.items() if not isinstance(v, list)}


class MetricsLog:
    """One JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def restart(self, through_step: int | None, final_step: int | None = None) -> None:
        """Start a fresh log, or (on resume) keep the records of steps <= `through_step`: the steps
        after the resumed checkpoint are trained and logged again, and must not appear twice; nor the
        final evaluation at `final_step`, which runs again after the loop."""
        if not self.enabled:
            return
        kept = []
        if through_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash mid-write
                if record.get("step", 0) <= through_step and not ("eval" in record and record["step"] == final_step):
                    kept.append(line + "\n")
        write_atomic(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe({"time": round(time.time(), 3), **record})) + "\n")


class TrainProgress:
    """Progress bar with loss, lr, it/s and ETA (main process only)."""

    def __init__(self, accelerator, start: int, total: int):
        self.enabled = accelerator.is_main_process
        self.start, self.total = start, total
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                            "{task.fields[speed]:.2f} it/s"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=console, disable=not self.enabled)
        self.seconds_per_step = float("nan")

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, completed=self.start,
                                           loss=float("nan"), lr=0.0, speed=0.0)
        self.t0 = time.perf_counter()
        return self

    def update(self, done: int, loss: float, lr: float) -> None:
        elapsed = time.perf_counter() - self.t0
        self.seconds_per_step = elapsed / max(1, done - self.start)
        self.progress.update(self.task, completed=done, loss=loss, lr=lr, speed=1 / self.seconds_per_step)

    def note(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)

    def __exit__(self, *exc):
        self.progress.stop()
        return False


def eval_progress(accelerator, loader):
    """Iterate `loader` under a transient progress bar."""
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not accelerator.is_main_process) as progress:
        yield from progress.track(loader, total=len(loader))


def metrics_table(result: dict, title: str) -> None:
    table = Table(title=title)
    for name in ("mIoU", "fwIoU", "pAcc", "mAcc"):
        table.add_column(name, justify="right")
    table.add_column("pixels", justify="right")
    table.add_row(*(f"{100 * result[k]:.2f}" for k in ("mIoU", "fwIoU", "pAcc", "mAcc")), f"{result['pixels']:,}")
    console.print(table)
