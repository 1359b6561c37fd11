"""Text that files, servers and arguments control reaches the terminal escaped.

Every hostile string below is planted in what a command shows (safetensors metadata and
tensor names, a PNG's `parameters`, file names, an error message, a usage error) and the
command's stdout and stderr are checked: no control or bidi character comes through raw,
and the text is still there to read, escaped, with rich markup printed as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_run import run_sdkit

# (planted text, how it must read on the terminal)
HOSTILE = [
    ("\x1b[2J", "\\x1b[2J"),                      # clear the screen
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),   # set the window title, ended by BEL
    ("over\rwrite", "over\\x0dwrite"),            # carriage return: overwrite the line
    ("back\bspace", "back\\x08space"),
    ("rev\u202eolleh", "rev\\u202eolleh"),        # right-to-left override
    ("iso\u2066late", "iso\\u2066late"),          # left-to-right isolate
    ("mark\u200fed", "mark\\u200fed"),            # right-to-left mark
    ("csi\x9b2J", "csi\\x9b2J"),                  # the one-byte C1 CSI
    ("del\x7fete", "del\\x7fete"),
    ("[red]x[/red]", "[red]x[/red]"),             # rich markup, printed as it is
    ("[link=https://evil]y[/link]", "[link=https://evil]y[/link]"),
    (":smile:", ":smile:"),                       # rich emoji code, printed as it is
]
IDS = [f"case{index}" for index in range(len(HOSTILE))]

# what must never reach a terminal raw: C0 but newline and tab, DEL, C1, bidi controls
FORBIDDEN = ({chr(c) for c in range(0x20)} - {"\n", "\t"}) | {chr(0x7F)} | {chr(c) for c in range(0x80, 0xA0)} \
    | {"\u061c", "\u200e", "\u200f", "\u2028", "\u2029"} | {chr(c) for c in range(0x202A, 0x202F)} \
    | {chr(c) for c in range(0x2066, 0x206A)}


@pytest.fixture(autouse=True)
def wide_plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # one table row per value (no wrapping inside the escapes), and no colour codes of rich's own
    monkeypatch.setenv("COLUMNS", "2000")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code, out, err = run_sdkit(capsys, *args)
    return code, out + err


def assert_escaped(output: str, escaped: str, *, title: bool = False) -> None:
    raw = sorted({f"U+{ord(char):04X}" for char in output if char in FORBIDDEN})
    assert not raw, (raw, output)
    # a table's title (a path) is folded at the table's width: compare it unfolded
    assert escaped in (output.replace("\n", "") if title else output), output


def file_name(text: str) -> str:
    return text.replace("/", "_")  # a file name cannot hold a slash


# ---- file contents -----------------------------------------------------------------------

@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_inspect_shows_metadata_and_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  hostile: str, escaped: str) -> None:
    path = tmp_path / f"model{file_name(hostile)}.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={f"key{hostile}": f"value{hostile}"})
    code, output = run(capsys, "inspect", str(path))
    assert code == 0
    assert_escaped(output, f"key{escaped}")
    assert_escaped(output, f"value{escaped}")
    assert_escaped(output, f"model{file_name(escaped)}", title=True)


@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_inspect_of_a_png_shows_parameters_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   hostile: str, escaped: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", f"a cat {hostile}\nNegative prompt: no{hostile}\nSteps: 20, Seed: 1, Size: 8x8")
    path = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    code, output = run(capsys, "inspect", str(path))
    assert code == 0
    assert_escaped(output, f"a cat {escaped}")
    assert_escaped(output, f"no{escaped}")


@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_lora_check_shows_module_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               hostile: str, escaped: str) -> None:
    base = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(base))
    module = f"lora_unet_odd{hostile.replace('.', '_')}"
    lora = tmp_path / "lora.safetensors"
    save_file({f"{module}.lora_down.weight": torch.zeros(2, 4), f"{module}.lora_up.weight": torch.zeros(4, 2)},
              str(lora))
    code, output = run(capsys, "lora", "check", str(base), str(lora))
    assert code in (0, 1)
    assert_escaped(output, f"odd{escaped.replace('.', '_')}")


@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_embed_inspect_shows_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          hostile: str, escaped: str) -> None:
    path = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)},
                "name": f"stored{hostile}", "step": 10, "sd_checkpoint_name": f"base{hostile}"}, path)
    code, output = run(capsys, "embed", "inspect", str(path))
    assert code == 0
    assert_escaped(output, f"stored{escaped}")
    assert_escaped(output, f"base{escaped}")


@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_hypernet_inspect_shows_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              hostile: str, escaped: str) -> None:
    from sdkit.adapters.hypernet import new_hypernetwork, save_hypernetwork

    path = tmp_path / f"net{file_name(hostile)}.pt"
    save_hypernetwork(path, new_hypernetwork(f"net{hostile}", (8,)))
    code, output = run(capsys, "hypernet", "inspect", str(path))
    assert code == 0
    assert_escaped(output, f"net{escaped}")  # the stored name
    assert_escaped(output, f"net{file_name(escaped)}.pt", title=True)


# ---- file names --------------------------------------------------------------------------

@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_hash_and_library_ls_show_file_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     hostile: str, escaped: str) -> None:
    name, shown_name = f"file{file_name(hostile)}.safetensors", f"file{file_name(escaped)}.safetensors"
    path = tmp_path / name
    save_file({"weight": torch.ones(3)}, str(path))
    code, output = run(capsys, "hash", str(path))
    assert code == 0
    assert_escaped(output, shown_name)
    library = tmp_path / "library"
    assert run(capsys, "library", "init", str(library), "--layout", "comfyui")[0] == 0
    assert run(capsys, "library", "add", str(path), "--library", str(library))[0] == 0
    code, output = run(capsys, "library", "ls", "--library", str(library))
    assert code == 0
    assert_escaped(output, shown_name)


# ---- error lines -------------------------------------------------------------------------

@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_error_lines_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 hostile: str, escaped: str) -> None:
    code, output = run(capsys, "inspect", str(tmp_path / f"gone{file_name(hostile)}.safetensors"))
    assert code == 1 and output.startswith("sdkit: error: ") and output.count("\n") == 1
    assert_escaped(output, f"gone{file_name(escaped)}.safetensors")
    # click's usage errors quote the argument too (in its own escaped form)
    code, output = run(capsys, "inspect", f"--bogus{hostile}", "--dtype", hostile)
    assert code == 2
    assert_escaped(output, "--bogus")


def test_a_subprocess_error_line_carries_no_raw_escape(tmp_path: Path) -> None:
    """The same through a real process and its byte streams, all strings at once."""
    import subprocess
    import sys

    planted = file_name("".join(hostile for hostile, _ in HOSTILE))
    result = subprocess.run([sys.executable, "-m", "sdkit", "inspect", str(tmp_path / planted)],
                            capture_output=True, timeout=120, env={**os.environ, "COLUMNS": "2000"})
    text = result.stderr.decode("utf-8")
    assert result.returncode == 1 and result.stdout == b""
    assert_escaped(text, file_name("".join(escaped for _, escaped in HOSTILE)))


# ---- the rule, for the next command --------------------------------------------------------

def test_cli_modules_render_only_through_the_safe_helpers() -> None:
    """Every rich console in sdkit/cli is a SafeConsole, and click.echo prints only JSON
    (json.dumps escapes controls) or fixed text; any other line goes through
    sdkit.cli.terminal.echo."""
    import ast

    cli = Path(__file__).resolve().parents[2] / "sdkit" / "cli"
    offenders = []
    for path in sorted(cli.glob("*.py")):
        if path.name in ("terminal.py", "main.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            if called == "Console":
                offenders.append(f"{path.name}:{node.lineno}: rich Console")
            if called == "click.echo" and node.args and not _json_or_literal(node.args[0]):
                offenders.append(f"{path.name}:{node.lineno}: click.echo of {ast.unparse(node.args[0])}")
    assert not offenders, offenders


def _json_or_literal(argument: object) -> bool:
    import ast

    if isinstance(argument, ast.Constant):
        return True
    if isinstance(argument, ast.IfExp):
        return _json_or_literal(argument.body) and _json_or_literal(argument.orelse)
    return isinstance(argument, ast.Call) and ast.unparse(argument.func) == "json.dumps"



@pytest.mark.parametrize(("hostile", "escaped"), HOSTILE, ids=IDS)
def test_a_download_bar_shows_the_file_name_escaped(hostile: str, escaped: str) -> None:
    """The transfer bar names the file a server chose; rich's columns read markup and emoji."""
    import io

    from sdkit.cli.hub_cmd import _RichProgress
    from sdkit.cli.terminal import SafeConsole

    screen = io.StringIO()
    bar = _RichProgress(SafeConsole(file=screen, force_terminal=True, width=200))
    bar.begin(f"file{hostile}", 100, 0)
    bar.update(50)
    bar.end()
    shown = screen.getvalue()  # a terminal's stream: rich's own cursor and colour codes included
    assert f"file{escaped}" in shown, shown
    if hostile != escaped:
        assert hostile not in shown, shown
