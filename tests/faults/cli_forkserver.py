"""Runs `sdkit` commands in forked processes for the fault tests.

Importing torch, diffusers and sdkit takes seconds; the fault tests start dozens of
commands and kill most of them. This server imports everything once, then for each
request forks a child that runs `sdkit.cli.main.main(argv)` exactly as `python -m sdkit`
does, with stdout and stderr sent to files and, on request, a file-size limit (the
`preexec_fn` of a subprocess, applied between fork and the command). Each child is a
separate process: SIGKILL ends it with no clean-up, like killing a real run.

Protocol, one JSON object per line: the test writes
`{"argv": [...], "stdout": PATH, "stderr": PATH, "fsize": BYTES|null, "hooks": {...}}`
(hooks: `install_hooks.apply`); the server answers `{"pid": N}` once the child runs and
`{"pid": N, "status": S}` when it ends (S: exit code, or minus the signal number).

A race, `{"race": [REQUEST, ...], "target": PATH}`, runs its commands at once, each held
just before it installs PATH until every one of them is there (or has ended), then let
go together; the server answers `{"pids": [...]}`, then `{"pids": [...], "statuses": [...]}`.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import sys
from typing import Any, TextIO

# what the commands import lazily: loaded once here, so children start at once
PRELOADED = ("diffusers", "transformers", "sdkit.cli.main", "sdkit.cli.convert_cmd", "sdkit.cli.merge_cmd",
             "sdkit.cli.lora_cmd", "sdkit.cli.vae_cmd", "sdkit.cli.embed_cmd", "sdkit.inspect",
             "sdkit.ops.convert.model", "sdkit.ops.merge", "sdkit.ops.lora.bake", "sdkit.ops.lora.extract",
             "sdkit.ops.vae.swap", "sdkit.ops.embed.add")


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
    from install_hooks import apply

    from sdkit.cli.main import main

    apply(request.get("hooks") or {})
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


def _answer(channel: TextIO, answer: dict[str, Any]) -> None:
    channel.write(json.dumps(answer) + "\n")
    channel.flush()


def _exit_code(pid: int, block: bool) -> int | None:
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def race(requests: list[dict[str, Any]], target: str, channel: TextIO) -> None:
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pids = []
    for request in requests:
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            os.close(go_write)
            run_child({**request, "hooks": {**request.get("hooks", {}), "meet": [target, ready_write, go_read]}},
                      channel)
        pids.append(pid)
    os.close(ready_write)
    os.close(go_read)
    _answer(channel, {"pids": pids})
    codes: dict[int, int] = {}
    ready = 0
    while ready + len(codes) < len(pids):  # each child reaches the meeting point or ends first
        if select.select([ready_read], [], [], 0.02)[0]:
            ready += len(os.read(ready_read, 16))
        for pid in pids:
            if pid not in codes and (code := _exit_code(pid, block=False)) is not None:
                codes[pid] = code
    os.write(go_write, b"g" * len(pids))
    os.close(go_write)
    os.close(ready_read)
    for pid in pids:
        if pid not in codes:
            codes[pid] = _exit_code(pid, block=True)
    _answer(channel, {"pids": pids, "statuses": [codes[pid] for pid in pids]})


def serve(channel: TextIO) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "race" in request:
            race(request["race"], request["target"], channel)
            continue
        pid = os.fork()
        if pid == 0:
            run_child(request, channel)
        _answer(channel, {"pid": pid})
        _answer(channel, {"pid": pid, "status": _exit_code(pid, block=True)})


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
