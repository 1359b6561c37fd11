"""Runs `sdkit` commands in forked processes for the fault tests.

Importing torch, diffusers and sdkit takes seconds; the fault tests start dozens of
commands and kill most of them. This server imports everything once, then for each
request forks a child that runs `sdkit.cli.main.main(argv)` exactly as `python -m sdkit`
does, with stdout and stderr sent to files and, on request, a file-size limit (the
`preexec_fn` of a subprocess, applied between fork and the command). Each child is a
separate process: SIGKILL ends it with no clean-up, like killing a real run.

Protocol, one JSON object per line: the test writes
`{"argv": [...], "stdout": PATH, "stderr": PATH, "fsize": BYTES|null}`; the server
answers `{"pid": N}` once the child runs and `{"pid": N, "status": S}` when it ends
(S: exit code, or minus the signal number).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import sys
from typing import Any, TextIO

# what the commands import lazily: loaded once here, so children start at once
PRELOADED = ("diffusers", "transformers", "sdkit.cli.main", "sdkit.cli.convert_cmd", "sdkit.cli.merge_cmd",
             "sdkit.cli.lora_cmd", "sdkit.cli.vae_cmd", "sdkit.cli.embed_cmd", "sdkit.inspect", "sdkit.ops.convert",
             "sdkit.ops.merge", "sdkit.ops.bake", "sdkit.ops.lora_extract", "sdkit.ops.vae", "sdkit.ops.embed")


def preload() -> None:
    import torch

    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: one thread is fastest
    for module in PRELOADED:
        importlib.import_module(module)


def _redirect(path: str, descriptor: int) -> None:
    opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(opened, descriptor)
    os.close(opened)


def run_child(request: dict[str, Any], channel: TextIO) -> None:
    """In the forked child: set up like a fresh process, run the command, exit."""
    channel.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    _redirect(request["stdout"], 1)
    _redirect(request["stderr"], 2)
    if request.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    from sdkit.cli.main import main

    code = 0
    try:
        main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback escaping main is itself a finding: show it
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def serve(channel: TextIO) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, channel)
        channel.write(json.dumps({"pid": pid}) + "\n")
        channel.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        channel.write(json.dumps({"pid": pid, "status": code}) + "\n")
        channel.flush()


def main() -> None:
    # answers go out on a copy of stdout; stdout itself goes to stderr so that nothing a
    # library prints while importing can garble the protocol
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload()
    channel.write(json.dumps({"ready": True}) + "\n")
    channel.flush()
    serve(channel)


if __name__ == "__main__":
    main()
