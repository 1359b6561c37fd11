"""`--log-dir`: training scalars per step for TensorBoard, and the same as `scalars.csv`.

The names follow kohya's sd-scripts (train_network.py `generate_step_logs`):
`loss/current`, `loss/average` (the mean over the last epoch's worth of steps),
`lr/unet` and, when text encoders train at their own rate, `lr/textencoder`. TensorBoard
event files are written through `torch.utils.tensorboard` (the `tensorboard` package,
installed with sdkit's `tensorboard` extra); without it only the CSV is written and the
run says so once.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Mapping
from pathlib import Path

CSV_NAME = "scalars.csv"


class TrainLog:
    """Scalars of each step, appended to `<log_dir>/scalars.csv` and TensorBoard events."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / CSV_NAME
        if not self.csv_path.exists():
            self._append([("step", "tag", "value")])
        self.writer = None
        self.tensorboard = importlib.util.find_spec("tensorboard") is not None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def _append(self, rows: list[tuple[object, ...]]) -> None:
        with open(self.csv_path, "a", newline="", encoding="utf-8") as file:
            csv.writer(file).writerows(rows)

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        self._append([(step, tag, repr(float(value))) for tag, value in scalars.items()])
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def step_scalars(losses: list[float], window: int, rates: list[float | None]) -> dict[str, float]:
    """kohya's step logs from the losses so far and each parameter group's rate."""
    recent = losses[-max(window, 1):]
    scalars = {"loss/current": losses[-1], "loss/average": sum(recent) / len(recent)}
    for tag, rate in zip(("lr/unet", "lr/textencoder"), rates, strict=False):
        if rate is not None:
            scalars[tag] = rate
    return scalars


def epoch_file(output: Path, epoch: int) -> Path:
    """kohya's per-epoch model file: `<stem>-<epoch, 6 digits><suffix>`."""
    return output.with_name(f"{output.stem}-{epoch:06d}{output.suffix}")


def epochs_done(steps: int, grad_accum: int, processes: int, batches_per_epoch: int) -> int:
    return steps * grad_accum * processes // max(batches_per_epoch, 1)
