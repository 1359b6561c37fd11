"""The downloader against a real local HTTP server: resume, restart, verify, name safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import payload
from hub_fakes import Blob, FileHost
from sdkit.errors import SdkitError
from sdkit.hub import TransferOptions, download

SIZE = 300_000


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def get_requests(host: FileHost) -> list[dict[str, str]]:
    return [s.headers for s in host.server.seen if s.method == "GET"]


def test_plain_url_arrives_byte_identical(file_host: FileHost, tmp_path: Path,
                                          options: TransferOptions) -> None:
    data = payload(SIZE)
    file_host.blobs["model.safetensors"] = Blob(data, etag='"v1"')
    [outcome] = download(file_host.url("model.safetensors"), output=tmp_path, options=options)
    assert outcome.path == tmp_path / "model.safetensors"
    assert outcome.path.read_bytes() == data
    assert outcome.sha256 == hashlib.sha256(data).hexdigest()
    assert outcome.status == "downloaded"
    assert leftovers(tmp_path) == []


def test_dropped_connections_resume_in_process(file_host: FileHost, tmp_path: Path,
                                               options: TransferOptions) -> None:
    data = payload(SIZE, seed=1)
    file_host.blobs["m.ckpt"] = Blob(data, etag='"v1"', drop_at=[100_000, 200_000])
    [outcome] = download(file_host.url("m.ckpt"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == data
    gets = get_requests(file_host)
    assert [g.get("Range") for g in gets] == [None, "bytes=100000-", "bytes=200000-"]
    assert all(g.get("If-Range") == '"v1"' for g in gets[1:])


def test_resume_after_the_process_gave_up(file_host: FileHost, tmp_path: Path,
                                          options: TransferOptions) -> None:
    data = payload(SIZE, seed=2)
    file_host.blobs["m.safetensors"] = Blob(data, etag='"v1"', drop_at=[150_000])
    options.policy.attempts = 1
    with pytest.raises(SdkitError, match="run the same command again to resume"):
        download(file_host.url("m.safetensors"), output=tmp_path, options=options)
    assert (tmp_path / "m.safetensors.part").stat().st_size == 150_000
    state = json.loads((tmp_path / "m.safetensors.part.json").read_text())
    assert state["url"] == file_host.url("m.safetensors") and state["etag"] == '"v1"'
    assert not (tmp_path / "m.safetensors").exists()

    options.policy.attempts = 4
    [outcome] = download(file_host.url("m.safetensors"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == data
    assert get_requests(file_host)[-1]["Range"] == "bytes=150000-"
    assert leftovers(tmp_path) == []


_KILLED_RUN = """
import sys
from pathlib import Path
from sdkit.hub import download
download(sys.argv[1], output=Path(sys.argv[2]))
"""


def test_resume_after_the_process_was_killed(file_host: FileHost, tmp_path: Path,
                                             options: TransferOptions) -> None:
    data = payload(SIZE, seed=3)
    blob = Blob(data, etag='"v1"', stall_at=120_000)
    file_host.blobs["k.safetensors"] = blob
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, file_host.url("k.safetensors"),
                              str(tmp_path)], env=env)
    part = tmp_path / "k.safetensors.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 120_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    blob.stall_at = None
    blob.resume.set()
    assert part.stat().st_size == 120_000 and (tmp_path / "k.safetensors.part.json").exists()

    [outcome] = download(file_host.url("k.safetensors"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == data
    assert get_requests(file_host)[-1]["Range"] == "bytes=120000-"


def test_server_ignoring_range_restarts_cleanly(file_host: FileHost, tmp_path: Path,
                                                options: TransferOptions) -> None:
    data = payload(SIZE, seed=4)
    file_host.blobs["r.safetensors"] = Blob(data, etag='"v1"', ignore_range=True, drop_at=[90_000])
    notes: list[str] = []
    options.notify = notes.append
    [outcome] = download(file_host.url("r.safetensors"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == data  # not 90 000 stale bytes + the whole file
    assert get_requests(file_host)[-1]["Range"] == "bytes=90000-"
    assert any("restarting from zero" in n for n in notes)


def test_changed_file_on_server_restarts_instead_of_mixing(file_host: FileHost, tmp_path: Path,
                                                           options: TransferOptions) -> None:
    old, new = payload(SIZE, seed=5), payload(SIZE, seed=6)
    file_host.blobs["c.bin"] = Blob(old, etag='"old"', drop_at=[50_000])
    options.policy.attempts = 1
    with pytest.raises(SdkitError):
        download(file_host.url("c.bin"), output=tmp_path, options=options)
    file_host.blobs["c.bin"] = Blob(new, etag='"new"')  # If-Range no longer matches: full 200
    options.policy.attempts = 4
    [outcome] = download(file_host.url("c.bin"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == new


def test_corrupted_body_is_refused_and_nothing_installed(file_host: FileHost, tmp_path: Path,
                                                         options: TransferOptions) -> None:
    data = payload(SIZE, seed=7)
    file_host.blobs["bad.safetensors"] = Blob(data, etag='"v1"', corrupt=True)
    with pytest.raises(SdkitError, match="sha256 mismatch.*nothing installed"):
        download(file_host.url("bad.safetensors"), output=tmp_path, options=options,
                 expected_sha256=hashlib.sha256(data).hexdigest())
    assert list(tmp_path.iterdir()) == []


def test_content_disposition_cannot_escape_the_folder(file_host: FileHost, tmp_path: Path,
                                                      options: TransferOptions) -> None:
    data = payload(1000)
    file_host.blobs["x"] = Blob(data, content_disposition='attachment; filename="../../evil.safetensors"')
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    [outcome] = download(file_host.url("x"), output=target, options=options)
    assert outcome.path == target / "evil.safetensors"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["a/b/evil.safetensors"]


@pytest.mark.parametrize("header, expected", [
    ("attachment; filename*=UTF-8''na%C3%AFve%20lora.safetensors", "naïve lora.safetensors"),
    ('attachment; filename="C:\\\\Windows\\\\x.dll"', "x.dll"),
    ('attachment; filename="/etc/passwd"', "passwd"),
    ('attachment; filename="a\\u0007b.pt"'.replace("\\u0007", "\x07"), "a_b.pt"),
    ('attachment; filename=".."', "download"),
])
def test_server_names_are_sanitised(file_host: FileHost, tmp_path: Path, options: TransferOptions,
                                    header: str, expected: str) -> None:
    file_host.blobs["n"] = Blob(b"abc", content_disposition=header)
    [outcome] = download(file_host.url("n"), output=tmp_path, options=options)
    assert outcome.path == tmp_path / expected


def test_name_collision_refused_renamed_or_overwritten(file_host: FileHost, tmp_path: Path,
                                                       options: TransferOptions) -> None:
    data = payload(2000, seed=8)
    file_host.blobs["lora.safetensors"] = Blob(data, etag='"v1"')
    (tmp_path / "lora.safetensors").write_bytes(b"someone else's file")
    with pytest.raises(SdkitError, match="--rename to keep both or --force to replace it"):
        download(file_host.url("lora.safetensors"), output=tmp_path, options=options)
    assert (tmp_path / "lora.safetensors").read_bytes() == b"someone else's file"

    [renamed] = download(file_host.url("lora.safetensors"), output=tmp_path, options=options, policy="rename")
    assert renamed.path == tmp_path / "lora (1).safetensors" and renamed.path.read_bytes() == data
    assert (tmp_path / "lora.safetensors").read_bytes() == b"someone else's file"

    [replaced] = download(file_host.url("lora.safetensors"), output=tmp_path, options=options, policy="overwrite")
    assert replaced.path == tmp_path / "lora.safetensors" and replaced.path.read_bytes() == data


def test_identical_file_is_already_present(file_host: FileHost, tmp_path: Path,
                                           options: TransferOptions) -> None:
    data = payload(2000, seed=9)
    file_host.blobs["same.safetensors"] = Blob(data)
    existing = tmp_path / "same.safetensors"
    existing.write_bytes(data)
    os.utime(existing, ns=(1_000_000_000, 1_000_000_000))
    for expected_sha256 in (hashlib.sha256(data).hexdigest(), None):  # known up front, or compared after
        [outcome] = download(file_host.url("same.safetensors"), output=tmp_path, options=options,
                             expected_sha256=expected_sha256)
        assert outcome.status == "already-present" and outcome.path == existing
        assert existing.stat().st_mtime_ns == 1_000_000_000  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors"]


def test_refused_install_keeps_the_download_for_a_rerun(file_host: FileHost, tmp_path: Path,
                                                        options: TransferOptions) -> None:
    data = payload(5000, seed=10)
    file_host.blobs["keep.safetensors"] = Blob(data, etag='"v1"')
    (tmp_path / "keep.safetensors").write_bytes(payload(5000, seed=11))  # same size, other bytes
    with pytest.raises(SdkitError, match="--rename"):
        download(file_host.url("keep.safetensors"), output=tmp_path, options=options)
    assert (tmp_path / "keep.safetensors.part").stat().st_size == 5000

    [outcome] = download(file_host.url("keep.safetensors"), output=tmp_path, options=options, policy="rename")
    assert outcome.path.name == "keep (1).safetensors" and outcome.path.read_bytes() == data
    last = get_requests(file_host)[-1]
    assert last["Range"] == "bytes=5000-"  # answered 416: nothing fetched twice
    assert leftovers(tmp_path) == []


def test_retry_after_is_honoured_and_retries_are_bounded(file_host: FileHost, tmp_path: Path,
                                                         options: TransferOptions, waits: list[float]) -> None:
    file_host.blobs["busy.pt"] = Blob(b"x" * 100)
    file_host.statuses["busy.pt"] = [(429, {"Retry-After": "7"}), (503, {})]
    [outcome] = download(file_host.url("busy.pt"), output=tmp_path, options=options)
    assert outcome.path.read_bytes() == b"x" * 100
    assert waits[0] == 7.0 and waits[1] < 1

    file_host.statuses["busy.pt"] = [(503, {})] * 10
    with pytest.raises(SdkitError, match="HTTP 503.*gave up after 4 tries"):
        download(file_host.url("busy.pt"), output=tmp_path / "again", options=options)
    assert len(waits) == 2 + 3


def test_web_page_instead_of_a_file_is_refused(file_host: FileHost, tmp_path: Path,
                                               options: TransferOptions) -> None:
    file_host.blobs["model.safetensors"] = Blob(b"<html>please log in</html>", content_type="text/html")
    with pytest.raises(SdkitError, match="web page"):
        download(file_host.url("model.safetensors"), output=tmp_path, options=options)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_one_clear_error(file_host: FileHost, tmp_path: Path, options: TransferOptions) -> None:
    with pytest.raises(SdkitError, match="HTTP 404: not found") as error:
        download(file_host.url("nothing.safetensors"), output=tmp_path, options=options)
    assert "\n" not in str(error.value)
