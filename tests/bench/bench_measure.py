"""Timing a process and describing the machine, for the benchmark report.

Each measured command is one child process: its wall time from spawn to exit, and its
own peak resident set size from `wait4` (on Linux `ru_maxrss`, in KiB; mapped file
pages the process touched count too).

Linux starts a child's `ru_maxrss` at the resident size of whatever process spawned it
(the memory it shared until `exec`), so commands are not spawned by this process (a test
run with torch loaded) but by a bare `python -S` launcher of a few MiB.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVERS = Path(__file__).with_name("bench_drivers.py")


@dataclass(frozen=True)
class Measurement:
    wall: float  # seconds
    rss_mb: float  # peak resident set, MiB
    status: int
    error: str  # last stderr line when status != 0

    @property
    def ok(self) -> bool:
        return self.status == 0


# spawns argv[1:] with stdout to $SDKIT_BENCH_STDOUT (default /dev/null), waits, prints
# "status seconds maxrss_kib"
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
out = os.environ.get("SDKIT_BENCH_STDOUT", os.devnull)
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ,
                      file_actions=[(os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss)
"""


def measure(argv: list[str], timeout: float = 3600, stdout: Path | None = None, root: Path = REPO) -> Measurement:
    """Run `argv` from the repository root (or another checkout's `root`, whose sdkit it
    then runs); wall time and the child's own peak RSS (its standard output goes to
    `stdout` when given)."""
    environment = {**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if stdout is not None:
        environment["SDKIT_BENCH_STDOUT"] = str(stdout)
    with tempfile.TemporaryFile() as errors:
        launched = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], cwd=root, env=environment,
                                  stdout=subprocess.PIPE, stderr=errors, text=True, timeout=timeout)
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
    status, wall, maxrss = launched.stdout.split()
    code = int(status)
    return Measurement(float(wall), int(maxrss) / 1024, code, lines[-1] if lines and code else "")


def sdkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdkit", "--quiet", *args]


def driver(name: str, *args: str) -> list[str]:
    return [sys.executable, str(DRIVERS), name, *args]


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size if path.exists() else 0


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def machine() -> dict[str, str]:
    """CPU, cores, memory, load and versions, taken when the run starts."""
    model = platform.processor() or "unknown"
    memory = "unknown"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cpu": model, "cores": str(os.cpu_count()), "memory": memory,
            "load average at start (1, 5, 15 min)": load, "python": platform.python_version(),
            **_versions()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("sdkit", "torch", "safetensors", "diffusers", "sd-mecha"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def peer_installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
