"""hf: sources against a local imitation of the Hub, with huggingface_hub as the oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import kohya_lora, payload
from hub_fakes import FakeHub
from sdkit.errors import SdkitError
from sdkit.hub import TransferOptions, download
from sdkit.hub.library import Library

REPO = "acme/tiny"


@pytest.fixture
def repo_files() -> dict[str, bytes]:
    return {
        "README.md": b"# tiny\n",
        "lora.safetensors": payload(200_000, seed=20),
        "unet/config.json": b'{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": payload(120_000, seed=21),
    }


@pytest.fixture
def hub(fake_hub: FakeHub, repo_files: dict[str, bytes]) -> FakeHub:
    fake_hub.add_repo(REPO, repo_files)
    return fake_hub


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def test_lfs_file_equals_what_huggingface_hub_downloads(hub: FakeHub, tmp_path: Path,
                                                        options: TransferOptions) -> None:
    from huggingface_hub import hf_hub_download

    [outcome] = download(f"hf:{REPO}/lora.safetensors", output=tmp_path / "mine", options=options)
    theirs = hf_hub_download(REPO, "lora.safetensors", endpoint=hub.endpoint,
                             cache_dir=tmp_path / "cache")
    assert outcome.path == tmp_path / "mine" / "lora.safetensors"
    assert outcome.path.read_bytes() == Path(theirs).read_bytes()
    assert outcome.source == f"hf:{REPO}/lora.safetensors@{hub.repos[REPO].commit}"
    assert any(s.method == "GET" for s in hub.storage.server.seen)  # came through the LFS redirect


def test_whole_repo_equals_snapshot_download(hub: FakeHub, tmp_path: Path, options: TransferOptions,
                                             repo_files: dict[str, bytes]) -> None:
    from huggingface_hub import snapshot_download

    outcomes = download(f"hf:{REPO}", output=tmp_path / "mine", options=options)
    snapshot_download(REPO, local_dir=tmp_path / "theirs", endpoint=hub.endpoint,
                      cache_dir=tmp_path / "cache")
    assert tree(tmp_path / "mine") == tree(tmp_path / "theirs") == repo_files
    assert {o.status for o in outcomes} == {"downloaded"}


def test_default_folder_is_named_after_the_repo(hub: FakeHub, tmp_path: Path, options: TransferOptions,
                                                monkeypatch: pytest.MonkeyPatch,
                                                repo_files: dict[str, bytes]) -> None:
    monkeypatch.chdir(tmp_path)
    download(f"hf:{REPO}/unet@main", options=options)
    assert tree(tmp_path / "tiny") == {k: v for k, v in repo_files.items() if k.startswith("unet/")}


def test_revision_pinned_by_commit(hub: FakeHub, tmp_path: Path, options: TransferOptions,
                                   repo_files: dict[str, bytes]) -> None:
    commit = hub.repos[REPO].commit
    [outcome] = download(f"hf:{REPO}/README.md@{commit}", output=tmp_path, options=options)
    assert outcome.path.read_bytes() == repo_files["README.md"]
    with pytest.raises(SdkitError, match="revision 'nope' not found"):
        download(f"hf:{REPO}/README.md@nope", output=tmp_path, options=options)


@pytest.mark.parametrize("source, message", [
    ("hf:acme/missing", "repository not found"),
    (f"hf:{REPO}/nothing.safetensors", "no file or folder 'nothing.safetensors'"),
    ("hf:only-one-part", "expected hf:OWNER/REPO"),
    (f"hf:{REPO}/../etc", "cannot contain"),
])
def test_bad_sources_give_one_line(hub: FakeHub, tmp_path: Path, options: TransferOptions,
                                   source: str, message: str) -> None:
    with pytest.raises(SdkitError, match=message) as error:
        download(source, output=tmp_path, options=options)
    assert "\n" not in str(error.value)


def test_corrupted_lfs_blob_is_refused(hub: FakeHub, tmp_path: Path, options: TransferOptions) -> None:
    hub.lfs_blob(REPO, "lora.safetensors").corrupt = True
    with pytest.raises(SdkitError, match="sha256 mismatch"):
        download(f"hf:{REPO}/lora.safetensors", output=tmp_path, options=options)
    assert list(tmp_path.iterdir()) == []


def test_hub_file_url_is_verified_like_hf_source(hub: FakeHub, tmp_path: Path,
                                                 options: TransferOptions) -> None:
    hub.lfs_blob(REPO, "lora.safetensors").corrupt = True
    with pytest.raises(SdkitError, match="sha256 mismatch"):
        download(f"{hub.endpoint}/{REPO}/resolve/main/lora.safetensors", output=tmp_path, options=options)


def test_lfs_download_resumes_on_a_later_run(hub: FakeHub, tmp_path: Path, options: TransferOptions,
                                             repo_files: dict[str, bytes]) -> None:
    hub.lfs_blob(REPO, "lora.safetensors").drop_at = [70_000]
    options.policy.attempts = 1
    with pytest.raises(SdkitError, match="run the same command again"):
        download(f"hf:{REPO}/lora.safetensors", output=tmp_path, options=options)
    assert (tmp_path / "lora.safetensors.part").stat().st_size == 70_000
    [outcome] = download(f"hf:{REPO}/lora.safetensors", output=tmp_path, options=options)
    assert outcome.path.read_bytes() == repo_files["lora.safetensors"]
    last = [s for s in hub.storage.server.seen if s.method == "GET"][-1]
    sha = hashlib.sha256(repo_files["lora.safetensors"]).hexdigest()
    assert last.headers["Range"] == "bytes=70000-" and last.headers["If-Range"] == f'"{sha}"'


def test_gated_repo_needs_a_token_which_never_leaves_the_hub(
        fake_hub: FakeHub, tmp_path: Path, options: TransferOptions,
        monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_secret_token_1234567890"
    data = payload(50_000, seed=22)
    fake_hub.add_repo("acme/gated", {"model.safetensors": data}, gated_token=token)
    with pytest.raises(SdkitError, match="gated repository.*HF_TOKEN"):
        download("hf:acme/gated/model.safetensors", output=tmp_path / "out", options=options)

    monkeypatch.setenv("HF_TOKEN", token)
    [outcome] = download("hf:acme/gated/model.safetensors", output=tmp_path / "out", options=options)
    assert outcome.path.read_bytes() == data
    assert f"Bearer {token}" in fake_hub.server.authorizations()
    assert fake_hub.storage.server.authorizations() == []  # dropped on the cross-host redirect
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_repo_into_library_places_model_files_only(fake_hub: FakeHub, tmp_path: Path,
                                                   options: TransferOptions) -> None:
    lora = kohya_lora(tmp_path / "l.safetensors", seed=7).read_bytes()
    fake_hub.add_repo("acme/style-lora", {"README.md": b"# a LoRA\n", "style.safetensors": lora})
    fake_hub.add_repo("acme/pipeline", {"model_index.json": b"{}", "unet/w.safetensors": lora})
    Library.init(tmp_path / "webui", "a1111").close()
    notes: list[str] = []
    options.notify = notes.append
    [outcome] = download("hf:acme/style-lora", library=tmp_path / "webui", options=options)
    assert outcome.path == (tmp_path / "webui" / "models" / "Lora" / "style.safetensors").resolve()
    assert outcome.path.read_bytes() == lora
    assert "README.md: not a model file, left out of the library" in notes
    with Library.open(tmp_path / "webui") as library:
        [entry] = library.index.entries()
    assert entry.source.startswith("hf:acme/style-lora/style.safetensors@")
    assert entry.hub["hf_repo"] == "acme/style-lora"
    with pytest.raises(SdkitError, match="hf:acme/pipeline: a diffusers folder"):
        download("hf:acme/pipeline", library=tmp_path / "webui", options=options)
