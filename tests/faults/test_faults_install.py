"""Putting an output in place: SIGKILL at every step of it, two writers racing for one
target, and a forced folder output over its own input, with and without renameat2.

A kill at any step leaves under the output name the old output, the new one or (a new
output without renameat2 only) an empty folder, never a part of one; a `.previous` set
aside without renameat2 is put back by the next write of the target. Of two writers
racing without --force exactly one installs and the other says the output already
exists and leaves nothing behind; with --force both may replace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
from faults_cli import FOLDER_COMMANDS, WRITING_COMMANDS, CliServer, assert_one_error_line

MODES = {"renameat2": {}, "without renameat2": {"no_renameat2": True}}
MAX_STEPS = 12


@pytest.fixture(scope="module")
def exchange_supported(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether the test folders' file system swaps folders in one step."""
    from sdkit.io.rename import rename_exchange

    folder = tmp_path_factory.mktemp("exchange")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return rename_exchange(folder / "a", folder / "b")


def needs_renameat2(mode: str, supported: bool) -> None:
    if mode == "renameat2" and not supported:
        pytest.skip("this file system has no renameat2 exchange; the fallback is tested")


def manifest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under a folder ({"": sha256} for a file)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file()}


def make_old_output(target: Path) -> dict[str, str]:
    """An existing output folder at `target`; its manifest."""
    (target / "unet").mkdir(parents=True)
    (target / "model_index.json").write_text('{"old": true}\n')
    (target / "unet" / "weights.safetensors").write_bytes(os.urandom(4096))
    return manifest(target)


# folder writers for the kill tests: one component folder (quick: the install steps are
# the same for every folder) and embed add
KILLED_COMMANDS = {
    "convert text encoder": lambda i, out: ["convert", str(i["a"]), "--only", "text_encoder", "--to", "diffusers",
                                            "--config", str(i["config"]), "-o", str(out)],
    "embed add": FOLDER_COMMANDS["embed add"],
}
VAE_FOLDER = lambda i, out: ["vae", "extract", str(i["a"]), "--to", "diffusers", "-o", str(out)]  # noqa: E731
KILL_CASES = [("convert text encoder", forced, mode) for forced in (False, True) for mode in sorted(MODES)] \
    + [("embed add", True, "renameat2")]


@pytest.fixture(scope="module")
def references(cli: CliServer, fault_inputs: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """command -> the manifest of what it writes undisturbed (to a path of the same name)."""
    found = {}
    for command, argv in KILLED_COMMANDS.items():
        output = tmp_path_factory.mktemp("reference") / "out"
        result = cli.run(*argv(fault_inputs, output))
        assert result.status == 0, result.stderr
        found[command] = manifest(output)
    return found


def leftovers(folder: Path, target: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != target.name)


@pytest.mark.parametrize(("command", "forced", "mode"), KILL_CASES,
                         ids=[f"{c}-{'forced over an old one' if f else 'new output'}-{m}" for c, f, m in KILL_CASES])
def test_sigkill_at_every_step_of_installing_a_folder(cli: CliServer, fault_inputs: dict[str, Path],
                                                      references: dict[str, dict[str, str]], exchange_supported: bool,
                                                      assert_inputs_intact: Callable[[], None], tmp_path: Path,
                                                      command: str, forced: bool, mode: str) -> None:
    needs_renameat2(mode, exchange_supported)
    target = tmp_path / "out"
    argv = KILLED_COMMANDS[command](fault_inputs, target)
    reference = references[command]
    old = make_old_output(target) if forced else None
    seen: set[str] = set()
    for step in range(MAX_STEPS):
        hooks = {**MODES[mode], "kill_before_step": [str(target), step]}
        result = cli.run(*argv, *(["--force"] if forced else []), hooks=hooks)
        if result.status == 0:  # ran past its last step
            assert manifest(target) == reference and leftovers(tmp_path, target) == []
            break
        assert result.status == -signal.SIGKILL, result.stderr
        state = killed_state(tmp_path, target, old, reference)
        seen.add(state)
        assert state != "empty claim" or (mode != "renameat2" and not forced), state
        assert state != "set aside" or (mode != "renameat2" and forced), state
        # the next write of the target clears what the kill left (and is refused when
        # the output is there again)
        follow = cli.run(*argv, hooks=MODES[mode])
        assert leftovers(tmp_path, target) == []
        if state in ("old", "new", "set aside", "empty claim"):
            assert_one_error_line(follow, str(target), "already exists (overwriting needs --force)")
            assert manifest(target) == {"old": old, "set aside": old, "new": reference,
                                        "empty claim": {}}[state]
        else:
            assert follow.status == 0, follow.stderr
            assert manifest(target) == reference
        shutil.rmtree(target)
        if forced:
            old = make_old_output(target)
    else:
        pytest.fail(f"still killed after {MAX_STEPS} steps")
    assert_inputs_intact()
    expected = {"old", "new", "set aside"} if forced and mode != "renameat2" else \
        {"old", "new"} if forced else {"missing"}
    assert expected <= seen, seen


def killed_state(folder: Path, target: Path, old: dict[str, str] | None, new: dict[str, str]) -> str:
    """What a kill left: the old or new output in place, the old one set aside with nothing
    in place, an empty claimed folder, or nothing."""
    set_aside = [name for name in leftovers(folder, target) if name.endswith(".previous")]
    assert all(name.startswith(f".{target.name}.") for name in leftovers(folder, target))
    assert len(set_aside) <= 1
    if target.exists():
        found = manifest(target)
        if found == {}:
            return "empty claim"
        assert found == new if set_aside else found in (old, new)  # an old one set aside may be half removed
        return "old" if found == old else "new"
    if set_aside:
        assert manifest(folder / set_aside[0]) == old
        return "set aside"
    assert old is None, "the old output is gone"
    return "missing"


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_two_writers_racing_for_one_target(cli: CliServer, fault_inputs: dict[str, Path],
                                           exchange_supported: bool, tmp_path: Path, kind: str,
                                           mode: str) -> None:
    needs_renameat2(mode, exchange_supported)
    name = "out.safetensors" if kind == "file" else "out"
    commands = [WRITING_COMMANDS["lora resize"], WRITING_COMMANDS["lora merge"]] if kind == "file" else \
        [KILLED_COMMANDS["convert text encoder"], VAE_FOLDER]
    references = []
    for index, command in enumerate(commands):
        reference = tmp_path / f"reference{index}" / name
        reference.parent.mkdir()
        assert cli.run(*command(fault_inputs, reference)).status == 0
        references.append(manifest(reference))
    folder = tmp_path / "race"
    folder.mkdir()
    target = folder / name
    results = cli.race([command(fault_inputs, target) for command in commands], target, hooks=MODES[mode])
    statuses = sorted(result.status for result in results)
    assert statuses == [0, 1], [result.stderr for result in results]
    winner, loser = sorted(range(2), key=lambda index: results[index].status)
    assert_one_error_line(results[loser], f"{target}: already exists (overwriting needs --force)")
    assert os.listdir(folder) == [name], "the loser left something behind"
    assert manifest(target) == references[winner]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_forced_writers_racing_may_both_replace(cli: CliServer, fault_inputs: dict[str, Path],
                                                exchange_supported: bool, tmp_path: Path, kind: str) -> None:
    needs_renameat2("renameat2", exchange_supported)
    name = "out.safetensors" if kind == "file" else "out"
    command = WRITING_COMMANDS["lora resize"] if kind == "file" else KILLED_COMMANDS["convert text encoder"]
    target = tmp_path / name
    results = cli.race([[*command(fault_inputs, target), "--force"] for _ in range(2)], target)
    assert [result.status for result in results] == [0, 0], [result.stderr for result in results]
    assert os.listdir(tmp_path) == [name]


def test_forced_folder_output_over_its_input_always_names_a_whole_folder(
        cli: CliServer, fault_inputs: dict[str, Path], exchange_supported: bool, tmp_path: Path) -> None:
    """With renameat2 the path names the old folder, then the new one: never nothing,
    never a third (the fallback leaves a moment with nothing there, and says so)."""
    needs_renameat2("renameat2", exchange_supported)
    pipeline = tmp_path / "pipe"
    assert cli.run(*FOLDER_COMMANDS["embed add"](fault_inputs, pipeline)).status == 0
    before, unet = pipeline.stat().st_ino, manifest(pipeline / "unet")
    run = cli.start("embed", "add", str(pipeline), f"{fault_inputs['embedding']}:other", "-o", str(pipeline),
                    "--force")
    seen = set()
    while run.poll() is None:
        seen.add(os.stat(pipeline).st_ino)  # FileNotFoundError: the path named nothing
        time.sleep(0.001)
    result = run.wait()
    assert result.status == 0, result.stderr
    after = pipeline.stat().st_ino
    assert after != before and seen <= {before, after}
    assert manifest(pipeline / "unet") == unet
    added = (pipeline / "tokenizer" / "added_tokens.json").read_text()
    assert '"other"' in added and '"mystyle"' in added
    assert os.listdir(tmp_path) == ["pipe"]
