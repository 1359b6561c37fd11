"""Opens each file named on the command line with `sdkit.io.open_model`, in this fresh
process, and prints one JSON line per file: the seconds it took, how far the process's
peak resident memory had grown over the baseline taken after the imports (MiB), and the
error message (null when the file opened).

The peak only ever rises, so each line's growth bounds that file's own; a crash of the
process (a signal) shows as a missing line. The peak is the kernel's high-water mark of
this process's memory (VmHWM): getrusage's ru_maxrss would start at the parent's size,
which it keeps across fork and exec.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, this process only


def main(paths: list[str]) -> None:
    from sdkit.errors import SdkitError
    from sdkit.io import open_model

    baseline = peak_mib()
    for path in paths:
        started = time.perf_counter()
        error = None
        try:
            open_model(Path(path)).close()
        except SdkitError as exc:
            error = str(exc)
        print(json.dumps({"path": path, "seconds": round(time.perf_counter() - started, 2),
                          "grown_mib": round(peak_mib() - baseline, 1), "error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
