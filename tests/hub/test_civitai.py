"""civitai: sources against a local imitation of the v1 API and its download redirect."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import kohya_lora, payload
from hub_fakes import CivitaiFile, CivitaiVersion, FakeCivitai
from sdkit.errors import SdkitError
from sdkit.hub import FileChoice, TransferOptions, download
from sdkit.hub.library import Library, lookup_file
from sdkit.hub.civitai import CivitaiClient

TOKEN = "civitai_secret_abcdef123456"


@pytest.fixture
def lora_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return kohya_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", seed=3).read_bytes()


@pytest.fixture
def civitai(fake_civitai: FakeCivitai, lora_bytes: bytes) -> FakeCivitai:
    fake_civitai.valid_token = TOKEN
    fake_civitai.add_model(101, "Tiny LoRA", "LORA", [CivitaiVersion(
        1001, 101, "v1.0", trained_words=["tinystyle", "tiny hat"], files=[
            CivitaiFile(11, "tinyLora_v1.safetensors", lora_bytes, primary=True),
            CivitaiFile(12, "tinyLora_v1_fp32.safetensors", payload(30_000, seed=31), fp="fp32")])])
    fake_civitai.add_model(102, "Members only", "Checkpoint", [CivitaiVersion(
        1002, 102, "v1", login_required=True,
        files=[CivitaiFile(21, "members.safetensors", payload(40_000, seed=32), primary=True)])])
    fake_civitai.add_model(103, "Early bird", "LORA", [CivitaiVersion(
        1003, 103, "v1", early_access_until="2031-05-01T00:00:00.000Z",
        files=[CivitaiFile(31, "early.safetensors", payload(1000, seed=33), primary=True)])])
    fake_civitai.add_model(104, "Bad hash", "LORA", [CivitaiVersion(
        1004, 104, "v1", files=[CivitaiFile(41, "bad.safetensors", payload(1000, seed=34), primary=True,
                                            published_sha256="0" * 64)])])
    return fake_civitai


def storage_gets(civitai: FakeCivitai) -> int:
    return sum(s.method == "GET" for s in civitai.storage.server.seen)


def test_primary_file_downloaded_and_verified(civitai: FakeCivitai, tmp_path: Path,
                                              options: TransferOptions, lora_bytes: bytes) -> None:
    [outcome] = download("civitai:101", output=tmp_path, options=options)
    assert outcome.path == tmp_path / "tinyLora_v1.safetensors"
    assert outcome.path.read_bytes() == lora_bytes
    assert outcome.source == "civitai:101@1001"
    assert outcome.facts["trigger_words"] == ["tinystyle", "tiny hat"]


def test_file_chosen_by_precision_and_refused_when_nothing_matches(
        civitai: FakeCivitai, tmp_path: Path, options: TransferOptions) -> None:
    [outcome] = download("civitai:101@1001", output=tmp_path, options=options, choice=FileChoice(fp="FP32"))
    assert outcome.path.name == "tinyLora_v1_fp32.safetensors"
    assert outcome.path.read_bytes() == payload(30_000, seed=31)
    with pytest.raises(SdkitError, match="no file matches format=GGUF; offered: tinyLora_v1.safetensors"):
        download("civitai:101", output=tmp_path, options=options, choice=FileChoice(format="GGUF"))


@pytest.mark.parametrize("path", ["/models/101/tiny-lora?modelVersionId=1001", "/models/101",
                                  "/api/download/models/1001"])
def test_civitai_urls_resolve_through_the_api(civitai: FakeCivitai, tmp_path: Path,
                                              options: TransferOptions, lora_bytes: bytes, path: str) -> None:
    [outcome] = download(f"{civitai.endpoint}{path}", output=tmp_path, options=options)
    assert outcome.path.read_bytes() == lora_bytes
    assert outcome.source == "civitai:101@1001"  # known through the API, so its sha256 was checked


def test_login_required_is_one_clear_line_and_token_is_a_header_only(
        civitai: FakeCivitai, tmp_path: Path, options: TransferOptions,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SdkitError, match=r"civitai:102@1002: HTTP 401: login required \(set CIVITAI_TOKEN\)") as error:
        download("civitai:102", output=tmp_path / "out", options=options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    civitai.storage.blobs["21"].drop_at = [20_000]
    options.policy.attempts = 1  # leave a .part and its state behind, then finish on a rerun
    with pytest.raises(SdkitError, match="again to resume"):
        download("civitai:102", output=tmp_path / "out", options=options)
    assert (tmp_path / "out" / "members.safetensors.part.json").is_file()
    options.policy.attempts = 4
    [outcome] = download("civitai:102", output=tmp_path / "out", options=options)
    assert outcome.path.read_bytes() == payload(40_000, seed=32)

    assert f"Bearer {TOKEN}" in civitai.server.authorizations()
    assert civitai.storage.server.authorizations() == []  # signed storage gets no token
    assert all(TOKEN not in s.path for s in civitai.server.seen + civitai.storage.server.seen)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_token_pasted_in_a_url_goes_to_the_header(civitai: FakeCivitai, tmp_path: Path,
                                                  options: TransferOptions) -> None:
    [outcome] = download(f"{civitai.endpoint}/models/102?token={TOKEN}", output=tmp_path, options=options)
    assert outcome.path.name == "members.safetensors"
    assert f"Bearer {TOKEN}" in civitai.server.authorizations()
    assert all(TOKEN not in s.path for s in civitai.server.seen + civitai.storage.server.seen)


def test_early_access_shows_the_deadline(civitai: FakeCivitai, tmp_path: Path, options: TransferOptions) -> None:
    with pytest.raises(SdkitError, match="HTTP 403: early access only until 2031-05-01"):
        download("civitai:103", output=tmp_path, options=options)


def test_unknown_model_is_404(civitai: FakeCivitai, tmp_path: Path, options: TransferOptions) -> None:
    with pytest.raises(SdkitError, match="civitai:999: HTTP 404: not found; server says: No model with id 999"):
        download("civitai:999", output=tmp_path, options=options)


def test_published_hash_mismatch_refused(civitai: FakeCivitai, tmp_path: Path, options: TransferOptions) -> None:
    with pytest.raises(SdkitError, match="sha256 mismatch"):
        download("civitai:104", output=tmp_path, options=options)
    assert list(tmp_path.iterdir()) == []


def test_api_rate_limit_waits_as_told(civitai: FakeCivitai, tmp_path: Path, options: TransferOptions,
                                      waits: list[float]) -> None:
    civitai.api_statuses = [(429, {"Retry-After": "3"})]
    [outcome] = download("civitai:101", output=tmp_path, options=options)
    assert outcome.status == "downloaded" and waits == [3.0]


def test_download_into_library_lands_by_kind_and_is_indexed(
        civitai: FakeCivitai, tmp_path: Path, options: TransferOptions, lora_bytes: bytes) -> None:
    Library.init(tmp_path / "ComfyUI", "comfyui").close()
    [outcome] = download("civitai:101", library=tmp_path / "ComfyUI", options=options)
    assert outcome.path == (tmp_path / "ComfyUI" / "models" / "loras" / "tinyLora_v1.safetensors").resolve()
    assert outcome.kind == "lora" and outcome.family == "sd1"
    with Library.open(tmp_path / "ComfyUI") as library:
        [entry] = library.index.entries()
    assert entry.path == "models/loras/tinyLora_v1.safetensors"
    assert entry.sha256 == hashlib.sha256(lora_bytes).hexdigest()
    assert entry.source == "civitai:101@1001"
    assert entry.trigger_words == ["tinystyle", "tiny hat"]
    assert entry.hub["base_model"] == "SD 1.5" and entry.hub["civitai_version_id"] == 1001

    before = storage_gets(civitai)
    [again] = download("civitai:101", library=tmp_path / "ComfyUI", options=options)
    assert again.status == "already-present" and storage_gets(civitai) == before
    assert list((tmp_path / "ComfyUI" / ".sdkit" / "downloads").iterdir()) == []


def test_lookup_by_hash_stores_what_civitai_knows(civitai: FakeCivitai, tmp_path: Path,
                                                  lora_bytes: bytes) -> None:
    mystery = tmp_path / "mystery.safetensors"
    mystery.write_bytes(lora_bytes)
    with Library.init(tmp_path / "webui", "a1111") as library:
        [placed] = library.add([mystery])
        result = lookup_file(placed.path, library, CivitaiClient())
        entry = library.index.get(placed.entry.path)
    assert result.stored and result.facts["model_name"] == "Tiny LoRA"
    assert entry is not None and entry.trigger_words == ["tinystyle", "tiny hat"]
    assert entry.hub["version_name"] == "v1.0" and entry.source == "civitai:101@1001"

    unknown = tmp_path / "unknown.safetensors"
    unknown.write_bytes(b"not on civitai")
    with pytest.raises(SdkitError, match="Civitai does not know this file"):
        lookup_file(unknown, None, CivitaiClient())
