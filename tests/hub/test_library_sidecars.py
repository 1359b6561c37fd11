"""A1111 / Forge sidecars beside library files, and `library lookup` over a whole library.

The Civitai stand-in is a server on 127.0.0.1 (hub_fakes.FakeCivitai); the file names,
keys and lookup order checked here are A1111's (modules/extra_networks.py,
ui_extra_networks.py `find_preview`, the LoRA card editor) and the Civitai Helper
extension's (`<stem>.civitai.info`, `<stem>.preview.<ext>`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cli_run import run_sdkit
from conftest import kohya_lora
from hub_fakes import CivitaiFile, CivitaiVersion, FakeCivitai
from PIL import Image

from sdkit.hub import RetryPolicy
from sdkit.hub.civitai import CivitaiClient
from sdkit.hub.library import Library, sidecars
from sdkit.hub.library.lookup_all import LookupSettings, lookup_library


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_sdkit(capsys, "--quiet", *args)


# --- reading and writing sidecars ------------------------------------------------------------

def test_user_metadata_written_by_a1111_reads_back(tmp_path: Path) -> None:
    model = tmp_path / "my.style.safetensors"
    model.write_bytes(b"x")
    metadata = {"description": "é", "sd version": "SDXL", "activation text": "glow, neon",
                "preferred weight": 0.8, "negative text": "", "notes": "mine"}
    # what A1111's editor writes: modules/ui_extra_networks_user_metadata.py write_user_metadata
    (tmp_path / "my.style.json").write_text(json.dumps(metadata, indent=4, ensure_ascii=False), encoding="utf8")
    found = sidecars.read_sidecars(model)
    assert found.user_metadata == metadata and found.problems == []
    sidecars.write_json(sidecars.user_metadata_path(model), found.user_metadata)
    assert json.loads((tmp_path / "my.style.json").read_text(encoding="utf8")) == metadata
    assert not list(tmp_path.glob(".*"))  # no partial file left behind


def test_unreadable_sidecar_is_a_problem_not_a_failure(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    (tmp_path / "m.json").write_text("{not json", encoding="utf8")
    (tmp_path / "m.civitai.info").write_text("[1, 2]", encoding="utf8")
    found = sidecars.read_sidecars(model)
    assert found.user_metadata is None and found.civitai_info is None
    assert [p.split(":")[0] for p in found.problems] == ["m.json", "m.civitai.info"]


@pytest.mark.parametrize(("present", "chosen"), [
    (["m.preview.png", "m.png"], "m.png"),              # <stem>.<ext> before <stem>.preview.<ext>
    (["m.preview.png", "m.webp"], "m.preview.png"),     # png before webp
    (["m.preview.jpg", "m.gif"], "m.preview.jpg"),
    (["m.preview.webp"], "m.preview.webp"),
    ([], None),
])
def test_preview_follows_a1111_lookup_order(tmp_path: Path, present: list[str], chosen: str | None) -> None:
    model = tmp_path / "m.safetensors"
    for name in ["m.safetensors", *present]:
        (tmp_path / name).write_bytes(b"x")
    found = sidecars.find_preview(model)
    assert (found.name if found else None) == chosen


def test_filling_never_replaces_a_key_the_user_has() -> None:
    existing = {"activation text": "", "preferred weight": 0.5, "notes": "n"}
    offered = {"activation text": "mystic", "preferred weight": 1.0, "sd version": "SD1"}
    assert sidecars.fill_missing(existing, offered) == {**existing, "sd version": "SD1"}
    assert sidecars.fill_missing({"sd version": "SD1", **existing}, offered) is None
    assert sidecars.fill_missing(None, offered) == offered


def test_offered_metadata_from_a_civitai_answer() -> None:
    version = {"trainedWords": ["mystic", " ", "glow"], "settings": {"strength": 0.7}}
    assert sidecars.offered_user_metadata(version, "lora", "sdxl-base") == {
        "activation text": "mystic, glow", "preferred weight": 0.7, "sd version": "SDXL"}
    assert sidecars.offered_user_metadata({"trainedWords": []}, "checkpoint", "sd1") == {}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_extension_from_first_bytes(fmt: str) -> None:
    expected = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}[fmt]
    assert sidecars.image_extension(image_bytes(fmt)[:16]) == expected
    assert sidecars.image_extension(b"<!doctype html>") is None


# --- lookup over a whole library -------------------------------------------------------------

@pytest.fixture
def webui(fake_civitai: FakeCivitai, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """An A1111 library with a LoRA Civitai knows (with a picture) and one it does not."""
    known = kohya_lora(tmp_path / "mystic.safetensors", seed=11)
    stranger = kohya_lora(tmp_path / "stranger.safetensors", seed=12)
    picture = image_bytes("JPEG")
    fake_civitai.add_model(5, "Mystic", "LORA", [CivitaiVersion(
        50, 5, "v2", trained_words=["mystic", "glow"], base_model="SD 1.5", images=[("cover", picture)],
        files=[CivitaiFile(500, "mystic.safetensors", known.read_bytes(), primary=True)])])
    root = tmp_path / "webui"
    assert run(capsys, "library", "init", str(root), "--layout", "a1111")[0] == 0
    assert run(capsys, "library", "add", str(known), str(stranger), "--library", str(root))[0] == 0
    return {"root": root, "lora": root / "models" / "Lora" / "mystic.safetensors",
            "stranger": root / "models" / "Lora" / "stranger.safetensors", "picture": picture}


def lookup_all(capsys: pytest.CaptureFixture[str], root: Path, *extra: str) -> dict[str, object]:
    code, out, err = run(capsys, "library", "lookup", "--library", str(root), "--pause", "0", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_lookup_writes_info_metadata_and_preview(webui: dict, fake_civitai: FakeCivitai,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lora: Path = webui["lora"]
    lora.with_name("mystic.json").write_text(json.dumps({"activation text": "my words", "notes": "keep"}, indent=4))
    report = lookup_all(capsys, webui["root"])
    assert (report["files"], report["asked"], report["unknown"]) == (2, 2, ["models/Lora/stranger.safetensors"])

    served = fake_civitai._version_json("Mystic", "LORA", fake_civitai._version(50)[2])
    assert json.loads(lora.with_name("mystic.civitai.info").read_text(encoding="utf-8")) == served
    # the user's keys stay; the weights say SD 1.x, which A1111 calls "SD1"
    assert json.loads(lora.with_name("mystic.json").read_text(encoding="utf-8")) == {
        "activation text": "my words", "notes": "keep", "sd version": "SD1"}
    assert lora.with_name("mystic.preview.jpg").read_bytes() == webui["picture"]
    stranger: Path = webui["stranger"]
    assert sorted(p.name for p in stranger.parent.iterdir() if p.name.startswith("stranger")) == \
        ["stranger.safetensors"]
    assert not [p for p in lora.parent.iterdir() if ".part" in p.name or ".preview-download" in p.name]


def test_lookup_fills_a_missing_json_and_is_resumable(webui: dict, fake_civitai: FakeCivitai,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    lora: Path = webui["lora"]
    lookup_all(capsys, webui["root"])
    assert json.loads(lora.with_name("mystic.json").read_text(encoding="utf-8")) == {
        "activation text": "mystic, glow", "sd version": "SD1"}
    lora.with_name("mystic.preview.jpg").unlink()  # as if the first run was stopped before the picture
    requests_before = len([s for s in fake_civitai.server.seen if "/by-hash/" in s.path])

    again = lookup_all(capsys, webui["root"])
    assert (again["asked"], again["from_info"], again["skipped_unknown"]) == (0, 1, 1)
    assert len([s for s in fake_civitai.server.seen if "/by-hash/" in s.path]) == requests_before
    assert lora.with_name("mystic.preview.jpg").read_bytes() == webui["picture"]

    forced = lookup_all(capsys, webui["root"], "--again")
    assert forced["asked"] == 2


def test_ls_and_show_read_the_sidecars(webui: dict, capsys: pytest.CaptureFixture[str]) -> None:
    lookup_all(capsys, webui["root"])
    code, out, _ = run(capsys, "library", "ls", "--library", str(webui["root"]), "--json")
    listed = {e["path"]: e["sidecars"] for e in json.loads(out)}
    mystic = listed["models/Lora/mystic.safetensors"]
    assert mystic["user_metadata"]["activation text"] == "mystic, glow"
    assert (mystic["civitai"]["model_id"], mystic["civitai"]["version_id"]) == (5, 50)
    assert mystic["preview"] == str(webui["lora"].with_name("mystic.preview.jpg"))
    assert listed["models/Lora/stranger.safetensors"] == {"user_metadata": None, "civitai": None,
                                                          "preview": None, "problems": []}
    code, out, err = run(capsys, "library", "show", "mystic", "--library", str(webui["root"]))
    assert code == 0, err
    assert "activation text: mystic, glow" in out and "civitai: Mystic — v2 (SD 1.5; model 5, version 50)" in out
    code, _, err = run(capsys, "library", "show", "nothing-like-it", "--library", str(webui["root"]))
    assert code == 1 and err.strip() == "sdkit: error: nothing-like-it: no file of that name in the library"


def test_lookup_pauses_between_requests_and_skips_videos(webui: dict, fake_civitai: FakeCivitai) -> None:
    fake_civitai._version(50)[2].image_type = "video"
    waits: list[float] = []
    client = CivitaiClient(policy=RetryPolicy(attempts=2, backoff=0.01, timeout=5.0, sleep=waits.append))
    with Library.open_existing(webui["root"]) as library:
        report = lookup_library(library, client, LookupSettings(pause=2.5))
    assert report.asked == 2 and waits == [2.5]
    assert sidecars.find_preview(webui["lora"]) is None


def test_a_preview_that_is_no_image_is_a_note(webui: dict, fake_civitai: FakeCivitai,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    fake_civitai.storage.blobs["cover"].data = b"<html>sign in</html>"
    fake_civitai.storage.blobs["cover"].content_type = "application/octet-stream"
    report = lookup_all(capsys, webui["root"])
    assert len(report["problems"]) == 1 and "not a PNG, JPEG, WebP or GIF image" in report["problems"][0]
    folder = webui["lora"].parent
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("mystic")) == \
        ["mystic.civitai.info", "mystic.json", "mystic.safetensors"]
