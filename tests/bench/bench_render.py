"""The benchmark report's files: `report.md` (machine, table) and `report.png` (bars of
time as a multiple of the baseline, and peak memory, for sdkit and each peer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench_measure import Measurement

NOTES = """\
- Each operation is one process (`python -m sdkit ...`, or a small Python driver for the
  baseline and the peers), timed from spawn to exit: Python and library start-up are
  included (see the start-up row).
- *baseline*: a plain Python loop reading the operation's inputs in 16 MiB chunks and
  writing as many bytes as its output, fsynced, measured in the same run; *×baseline* is
  wall time divided by it (1.0 = as fast as copying the bytes). It writes through the
  page cache, as most programs do; sdkit's writer bypasses it (O_DIRECT) where the file
  system allows. The "plain copy, O_DIRECT writes" row is that baseline with such
  writes: its ratio is how much of an sdkit ratio below 1 is the write path alone.
- Each sdkit operation runs several times (`SDKIT_BENCH_REPEATS`, default 3; TIES and
  extract once), each run right after a run of its baseline, because the disk's write
  speed varies several-fold within minutes on a shared machine; the table shows the
  fastest run of each and the largest peak RSS of all runs. Peers run once. The inputs
  are read once, untimed, before each pair (the host pages cold files out).
- Input hashes: sdkit records each input's sha256 in its outputs. Its hash cache (kept
  with the bench inputs) knows them after the first run, as it would on a user's
  machine after the first `sdkit hash` or operation; the "hash cache off" row shows an
  operation that hashes its inputs on background threads while it writes.
- Peak RSS is the process's own maximum resident set (`wait4`), memory-mapped file pages
  it touched included.
- sdkit and the baseline fsync their output before exiting; the peers do not, so part of
  their writing is still in the page cache when their time stops.
- *full load*: the WebUI merger's and kohya's way, written out in a few lines
  (`tests/bench/bench_drivers.py`): `load_file` every input, compute in float32,
  `save_file`.
- Inputs: random fp16 weights with the real key names and shapes, built by
  `tests/bench/bench_models.py`; the LoRA is kohya format, rank 32, on every attention,
  feed-forward and text-encoder projection.
"""


@dataclass
class Row:
    family: str
    operation: str
    detail: str  # bytes in -> out
    sdkit: Measurement
    baseline: Measurement | None
    peers: dict[str, Measurement] = field(default_factory=dict)

    def ratio(self, measurement: Measurement) -> float | None:
        if self.baseline is None or not self.baseline.ok or not measurement.ok or self.baseline.wall <= 0:
            return None
        return measurement.wall / self.baseline.wall


def _cell(row: Row, measurement: Measurement) -> tuple[str, str, str]:
    if not measurement.ok:
        return "failed", "—", measurement.error.replace("|", "/")[:120]
    ratio = row.ratio(measurement)
    return f"{measurement.wall:.1f}", f"{measurement.rss_mb:,.0f}", "—" if ratio is None else f"{ratio:.2f}"


def _peers(row: Row) -> str:
    parts = []
    for name, measurement in row.peers.items():
        wall, rss, ratio = _cell(row, measurement)
        parts.append(f"{name}: failed ({ratio})" if wall == "failed"
                     else f"{name}: {wall} s, {rss} MiB, ×{ratio}")
    return "<br>".join(parts) or "—"


def markdown(machine: dict[str, str], rows: list[Row], startup: Measurement, remark: str) -> str:
    lines = ["# sdkit benchmark report", "", "Written by `make bench` (`tests/bench/test_bench_report.py`).", "",
             "| machine | |", "|---|---|", *(f"| {key} | {value} |" for key, value in machine.items()), "",
             remark, "", NOTES, "",
             "| model | operation | bytes in → out | baseline s | sdkit s | ×baseline | sdkit peak RSS MiB | peers (wall, peak RSS, ×baseline) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        wall, rss, ratio = _cell(row, row.sdkit)
        base = f"{row.baseline.wall:.1f}" if row.baseline and row.baseline.ok else "—"
        lines.append(f"| {row.family} | {row.operation} | {row.detail} | {base} | {wall} | {ratio} | {rss} | {_peers(row)} |")
    lines += ["", (f"Start-up floor: `python -c 'import torch'` takes {startup.wall:.1f} s and "
                   f"{startup.rss_mb:,.0f} MiB here."), ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Bar:
    label: str  # the operation, on its group's first bar only
    tool: str
    ratio: float
    rss_mb: float


def _bars(rows: list[Row]) -> list[Bar]:
    """One bar per tool that ran an operation successfully, sdkit first."""
    bars = []
    for row in rows:
        runs = {"sdkit": row.sdkit, **row.peers}
        present = [(tool, m) for tool, m in runs.items() if m.ok and row.ratio(m) is not None]
        for index, (tool, measurement) in enumerate(present):
            label = f"{row.family} {row.operation}" if index == 0 else ""
            bars.append(Bar(label, tool, row.ratio(measurement) or 0.0, measurement.rss_mb))
    return bars


def chart(path: Path, rows: list[Row]) -> None:
    bars = _bars(rows)
    tools = list(dict.fromkeys(bar.tool for bar in bars))
    try:
        import matplotlib
    except ImportError:
        _pillow_chart(path, bars, tools)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {tool: f"C{index}" for index, tool in enumerate(tools)}
    positions, y = [], 0.0
    for bar in bars:
        y += 0.6 if bar.label and positions else 0.0  # a gap before each operation
        positions.append(y)
        y += 1.0
    figure, (times, memory) = plt.subplots(1, 2, figsize=(14, 0.32 * y + 1.5), sharey=True)
    for axis, values in ((times, [bar.ratio for bar in bars]), (memory, [bar.rss_mb for bar in bars])):
        axis.barh(positions, values, 0.9, color=[colors[bar.tool] for bar in bars])
    times.set_yticks(positions, [bar.label for bar in bars])
    times.invert_yaxis()
    times.axvline(1.0, color="black", linewidth=0.8)
    times.set_xlabel("wall time ÷ plain read+write of the same bytes (lower is better)")
    memory.set_xlabel("peak RSS, MiB (lower is better)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[tool]) for tool in tools]
    memory.legend(handles, tools, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _pillow_chart(path: Path, bars: list[Bar], tools: list[str]) -> None:
    """Bars of time ÷ baseline without matplotlib."""
    from PIL import Image, ImageDraw

    colors = {tool: color for tool, color in zip(tools, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"))}
    height, left, width = 16, 300, 600
    biggest = max((bar.ratio for bar in bars), default=1.0) or 1.0
    image = Image.new("RGB", (left + width + 160, height * len(bars) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), "wall time / plain read+write of the same bytes (lower is better)", fill="black")
    for index, bar in enumerate(bars):
        top, length = 32 + index * height, int(width * bar.ratio / biggest)
        draw.text((8, top), bar.label, fill="black")
        draw.rectangle([left, top, left + length, top + height - 3], fill=colors.get(bar.tool, "#7f7f7f"))
        draw.text((left + length + 4, top), f"{bar.tool} {bar.ratio:.2f}", fill="black")
    image.save(path)
