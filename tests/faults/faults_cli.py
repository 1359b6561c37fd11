"""The test side of the fork server (`cli_forkserver.py`): start, wait for and kill
`sdkit` commands, and the checks every fault test shares."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SERVER = Path(__file__).with_name("cli_forkserver.py")
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0  # the server imports torch and diffusers on a loaded machine
RUN_TIMEOUT = 120.0

# every command that writes a model file: name -> argument list (INPUTS: the fixture's
# paths; OUT: the output path)
WRITING_COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "convert": lambda i, out: ["convert", str(i["a"]), "-o", str(out), "--dtype", "fp16"],
    "merge": lambda i, out: ["merge", str(i["a"]), str(i["b"]), "-o", str(out), "--alpha", "0.3"],
    "lora bake": lambda i, out: ["lora", "bake", str(i["a"]), f"{i['lora']}:0.8", "-o", str(out)],
    "lora extract": lambda i, out: ["lora", "extract", str(i["b"]), str(i["a"]), "-o", str(out), "--rank", "2"],
    "lora merge": lambda i, out: ["lora", "merge", str(i["lora"]), str(i["lora2"]), "-o", str(out)],
    "lora resize": lambda i, out: ["lora", "resize", str(i["lora"]), "-o", str(out), "--rank", "2"],
    "vae swap": lambda i, out: ["vae", "swap", str(i["a"]), str(i["vae"]), "-o", str(out)],
    "vae extract": lambda i, out: ["vae", "extract", str(i["a"]), "-o", str(out)],
}
# every command that writes a diffusers folder at OUT
FOLDER_COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "convert diffusers": lambda i, out: ["convert", str(i["a"]), "--to", "diffusers", "--config", str(i["config"]),
                                         "-o", str(out)],
    "embed add": lambda i, out: ["embed", "add", str(i["a"]), f"{i['embedding']}:mystyle", "--to", "diffusers",
                                 "-o", str(out), "--tokenizer", str(i["tokenizer"])],
}


@dataclass
class Finished:
    """How a command ended: exit code (minus the signal number if killed) and its output."""

    status: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


class Run:
    """A command started by the server and not yet reported finished."""

    def __init__(self, server: CliServer, pid: int, stdout: Path, stderr: Path) -> None:
        self.server, self.pid, self.stdout, self.stderr = server, pid, stdout, stderr
        self.finished: Finished | None = None

    def poll(self) -> Finished | None:
        if self.finished is None:
            answer = self.server.answer(timeout=0)
            if answer is not None:
                self._finish(answer)
        return self.finished

    def wait(self, timeout: float = RUN_TIMEOUT) -> Finished:
        if self.finished is None:
            answer = self.server.answer(timeout=timeout)
            if answer is None:
                self.kill()
                raise TimeoutError(f"sdkit run {self.pid} took over {timeout} s")
            self._finish(answer)
        assert self.finished is not None
        return self.finished

    def kill(self) -> Finished:
        """SIGKILL now (no clean-up can run), then collect the status."""
        if self.finished is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended on its own an instant ago
        return self.wait()

    def _finish(self, answer: dict[str, Any]) -> None:
        assert answer["pid"] == self.pid, answer
        # a child killed right after the fork never opened its output files
        self.finished = Finished(answer["status"], *(path.read_text(errors="replace") if path.exists() else ""
                                                     for path in (self.stdout, self.stderr)))


class CliServer:
    """One fork server process; runs commands one at a time."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        # SOURCE_DATE_EPOCH: outputs are compared byte for byte with a reference run, so every
        # run writes the same ModelSpec date
        environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                       "SOURCE_DATE_EPOCH": "1700000000"}
        self.process = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO, env=environment)
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read_answers, daemon=True).start()
        ready = self.answer(timeout=START_TIMEOUT)
        if ready != {"ready": True}:
            raise RuntimeError(f"the sdkit fork server did not start (exit {self.process.poll()})")

    def _read_answers(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.answers.put(json.loads(line))

    def answer(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.answers.get(timeout=timeout) if timeout > 0 else self.answers.get_nowait()
        except queue.Empty:
            return None

    def _request(self, argv: tuple[str, ...] | list[str], **options: Any) -> tuple[dict[str, Any], Path, Path]:
        self.count += 1
        stdout, stderr = (self.scratch / f"run{self.count}.{name}" for name in ("out", "err"))
        return {"argv": list(argv), "stdout": str(stdout), "stderr": str(stderr), **options}, stdout, stderr

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.answer(timeout=RUN_TIMEOUT)
        if answer is None or not ("pid" in answer or "pids" in answer):
            raise RuntimeError(f"the sdkit fork server did not start {request}: {answer}")
        return answer

    def start(self, *argv: str, fsize: int | None = None, hooks: dict[str, Any] | None = None) -> Run:
        """Start a command; `hooks` are faults to inject (see install_hooks.apply)."""
        request, stdout, stderr = self._request(argv, fsize=fsize, hooks=hooks or {})
        return Run(self, self._send(request)["pid"], stdout, stderr)

    def run(self, *argv: str, fsize: int | None = None, hooks: dict[str, Any] | None = None) -> Finished:
        return self.start(*argv, fsize=fsize, hooks=hooks).wait()

    def race(self, commands: list[list[str]], target: Path, hooks: dict[str, Any] | None = None) -> list[Finished]:
        """Run `commands` at once, all let go together right before they install `target`."""
        made = [self._request(argv, hooks=hooks or {}) for argv in commands]
        self._send({"race": [request for request, _, _ in made], "target": str(target)})
        answer = self.answer(timeout=RUN_TIMEOUT)
        if answer is None or "statuses" not in answer:
            raise TimeoutError(f"the race on {target} did not end: {answer}")
        return [Finished(status, *(path.read_text(errors="replace") if path.exists() else "" for path in (out, err)))
                for status, (_, out, err) in zip(answer["statuses"], made)]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assert_one_error_line(result: Finished, *mentions: str) -> str:
    """Exit 1 and a single `sdkit: error:` line on stderr mentioning each of `mentions`."""
    assert result.status == 1, (result.status, result.stderr)
    lines = result.error_lines
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sdkit: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    return lines[0]
