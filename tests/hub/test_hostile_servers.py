"""Servers that send too much, too little per connection, or too slowly: every download
ends, in a bounded number of tries and a bounded time, and keeps nothing it should not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import payload
from hub_fakes import Blob, FakeHub, FileHost
from cli_run import run_sdkit
from sdkit.errors import SdkitError
from sdkit.hub import TransferOptions, download

LISTED = 100_000


class Recorder:
    """A TransferProgress that remembers the most bytes the part ever held."""

    def __init__(self) -> None:
        self.began, self.most = 0, 0

    def begin(self, name: str, total: int | None, done: int) -> None:
        self.began += 1
        self.most = max(self.most, done)

    def update(self, done: int) -> None:
        self.most = max(self.most, done)

    def end(self) -> None:
        pass


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `sdkit --quiet ARGS`."""
    started = time.monotonic()
    code, out, err = run_sdkit(capsys, "--quiet", *args)
    return code, out, err, time.monotonic() - started


def gets(host: FileHost) -> int:
    return sum(1 for seen in host.server.seen if seen.method == "GET")


def listed_file(hub: FakeHub, extra: int, framing: str) -> str:
    """An hf: source whose listed size is LISTED while the storage sends `extra` more."""
    data = payload(LISTED, seed=3)
    hub.add_repo("org/big", {"model.safetensors": data})
    blob = hub.lfs_blob("org/big", "model.safetensors")
    blob.data, blob.framing = data + payload(extra, seed=4), framing
    return "hf:org/big/model.safetensors"


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_body_longer_than_listed_is_cut_at_the_listed_size(fake_hub: FakeHub, tmp_path: Path,
                                                           options: TransferOptions, framing: str) -> None:
    source = listed_file(fake_hub, 8 << 20, framing)  # 8 MiB more than the hub lists
    options.progress = recorder = Recorder()
    with pytest.raises(SdkitError, match=f"more than the {LISTED} bytes expected; the download was discarded"):
        download(source, output=tmp_path, options=options)
    assert recorder.most <= LISTED
    assert list(tmp_path.iterdir()) == []  # no part, no state, no file


def test_announced_length_beyond_the_listed_size_is_refused_before_reading(
        fake_hub: FakeHub, tmp_path: Path, options: TransferOptions) -> None:
    source = listed_file(fake_hub, 1, "length")
    options.progress = recorder = Recorder()
    with pytest.raises(SdkitError, match=f"sends {LISTED + 1} bytes but the hub lists {LISTED}"):
        download(source, output=tmp_path, options=options)
    assert recorder.began == 0  # not a byte of the body was read
    assert list(tmp_path.iterdir()) == []


def test_overlong_body_through_the_command_is_one_line(fake_hub: FakeHub, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    source = listed_file(fake_hub, 4 << 20, "close")
    code, out, err, _ = run_cli(capsys, "download", source, "-o", str(tmp_path / "out"))
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"sdkit: error: {source}@")
    assert err.rstrip().endswith(f"the server sends more than the {LISTED} bytes expected; "
                                 "the download was discarded, nothing installed")
    assert not any((tmp_path / "out").iterdir())


# --- bounded tries and time ---------------------------------------------------------------

def test_one_byte_per_connection_ends_after_the_allowed_tries(file_host: FileHost, tmp_path: Path,
                                                              options: TransferOptions) -> None:
    file_host.blobs["drip.safetensors"] = Blob(payload(3000), etag='"d"', per_connection=1)
    with pytest.raises(SdkitError, match="gave up after 4 tries at 0.0 MiB"):
        download(file_host.url("drip.safetensors"), output=tmp_path, options=options)
    assert gets(file_host) == options.policy.attempts == 4
    assert (tmp_path / "drip.safetensors.part").stat().st_size == 4  # kept: a later run resumes


def test_progress_earns_back_tries_only_so_often(file_host: FileHost, tmp_path: Path,
                                                 options: TransferOptions) -> None:
    file_host.blobs["slice.safetensors"] = Blob(payload(100_000), etag='"s"', per_connection=2000)
    policy = options.policy
    policy.attempts, policy.progress_bytes, policy.tries_per_attempt = 2, 1000, 3
    with pytest.raises(SdkitError, match="gave up after 6 tries"):
        download(file_host.url("slice.safetensors"), output=tmp_path, options=options)
    assert gets(file_host) == 6
    assert (tmp_path / "slice.safetensors.part").stat().st_size == 6 * 2000


def test_a_trickle_is_cut_by_the_speed_floor(file_host: FileHost, tmp_path: Path,
                                             options: TransferOptions) -> None:
    file_host.blobs["slow.safetensors"] = Blob(payload(50_000), etag='"t"', trickle_s=0.02)
    policy = options.policy
    policy.attempts, policy.min_speed, policy.speed_window = 2, 1000.0, 0.3
    started = time.monotonic()
    with pytest.raises(SdkitError, match=r"under 1000 bytes/s; gave up after 2 tries"):
        download(file_host.url("slow.safetensors"), output=tmp_path, options=options)
    assert time.monotonic() - started < 5 and gets(file_host) == 2


def test_command_ends_on_a_one_byte_server_and_a_trickle(file_host: FileHost, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    file_host.blobs["drip.safetensors"] = Blob(payload(3000), etag='"d"', per_connection=1)
    code, out, err, seconds = run_cli(capsys, "download", file_host.url("drip.safetensors"),
                                      "-o", str(tmp_path), "--retries", "2")
    assert (code, out, len(err.splitlines())) == (1, "", 1) and "gave up after 2 tries" in err
    assert gets(file_host) == 2 and seconds < 30

    file_host.blobs["slow.safetensors"] = Blob(payload(50_000), etag='"t"', trickle_s=0.05)
    code, out, err, seconds = run_cli(capsys, "download", file_host.url("slow.safetensors"),
                                      "-o", str(tmp_path), "--max-time", "1.5")
    assert (code, out, len(err.splitlines())) == (1, "", 1) and "--max-time 1.5 s reached" in err
    assert 1.5 <= seconds < 10
    assert 0 < (tmp_path / "slow.safetensors.part").stat().st_size < 100  # kept to resume


def test_download_help_documents_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _, _ = run_cli(capsys, "download", "--help")
    assert code == 0
    words = " ".join(out.split())
    assert "--max-time SECONDS" in words and "10 times as many tries in all" in words
    assert "1 KiB/s over 60 s" in words
