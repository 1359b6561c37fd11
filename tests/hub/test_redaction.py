"""Credentials in URLs never reach the screen, the --json output, the index or the disk."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import kohya_lora
from hub_fakes import Blob, FileHost
from cli_run import run_sdkit
from sdkit.hub.redact import REDACTED, redact_text, redact_url

# How hosts and users spell credentials in a query string (S3, GCS, Azure SAS, CloudFront,
# Civitai, Hugging Face, Azure functions, generic APIs), in several cases and separators
SECRET_NAMES = [
    "token", "Token", "TOKEN", "hf_token", "HF-Token", "access_token", "access-token",
    "accessToken", "AccessToken", "X-Amz-Signature", "x-amz-signature", "X-Amz-Security-Token",
    "X-Amz-Credential", "X-Goog-Signature", "X-Goog-Credential", "Signature", "sig", "SIG",
    "password", "Password", "passwd", "pwd", "secret", "client_secret", "client-secret",
    "api_key", "api-key", "apikey", "apiKey", "API_KEY", "key", "Key", "Key-Pair-Id", "auth",
    "Authorization", "auth_token", "session", "sessionid", "session_id", "SessionToken",
    "refresh_token", "id_token", "code", "jwt", "private_token", "oauth_signature",
    "api%5Fkey",  # percent-encoded name
]
KEPT_NAMES = ["type", "format", "fp", "modelVersionId", "X-Amz-Date", "X-Amz-Expires",
              "X-Amz-SignedHeaders", "response-content-disposition", "download", "v", "se", "sp"]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_credential_like_parameters_are_redacted(name: str) -> None:
    url = f"https://cdn.example.org/models/x.safetensors?type=Model&{name}=hunter2-{len(name)}&fp=fp16"
    redacted = redact_url(url)
    assert "hunter2" not in redacted
    assert redacted == f"https://cdn.example.org/models/x.safetensors?type=Model&{name}={REDACTED}&fp=fp16"


def test_other_parameters_are_kept_as_they_were() -> None:
    query = "&".join(f"{name}=v%20{i}" for i, name in enumerate(KEPT_NAMES))
    url = f"https://example.org/api/download/models/5?{query}"
    assert redact_url(url) == url


@pytest.mark.parametrize("userinfo", ["user:pass", "user", ":pass", "hf_abcdef", "a%40b:p%3Aw"])
def test_userinfo_is_redacted(userinfo: str) -> None:
    assert redact_url(f"https://{userinfo}@example.org:8443/f.ckpt?x=1") == \
        f"https://{REDACTED}@example.org:8443/f.ckpt?x=1"


def test_fragment_credentials_and_text_around_urls() -> None:
    assert redact_url("https://h/f#access_token=abc&state=1") == f"https://h/f#access_token={REDACTED}&state=1"
    assert redact_url("https://h/f#section-2") == "https://h/f#section-2"
    message = ("denied for http://u:pw@h/x?Signature=abc123&a=1 (token=zzz9, Bearer hf_qqq) "
               "and https://h/y?sig=ddd.")
    redacted = redact_text(message)
    for secret in ("pw", "abc123", "zzz9", "hf_qqq", "ddd"):
        assert secret not in redacted.replace(REDACTED, ""), secret
    assert "a=1" in redacted and "http://" in redacted and "https://h/y" in redacted


# --- every place a URL goes, through the command line -----------------------------------

SECRETS = [f"zq{i}secret" for i in range(len(SECRET_NAMES))]


def secret_url(host: FileHost, name: str) -> str:
    """The file's URL with user:password and every secret spelling, each with its own value."""
    query = "&".join(f"{n}={v}" for n, v in zip(SECRET_NAMES, SECRETS))
    origin = host.server.origin.replace("http://", f"http://user:{SECRETS[0]}x@")
    return f"{origin}/files/{quote(name)}?keep=this&{query}"


run_cli = run_sdkit  # with the chatter on (not --quiet)


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text] + (["user:"] if "user:" in text else [])
    assert not leaked, f"{where}: {leaked}"


def assert_no_secret_on_disk(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_bytes().decode("latin-1"), str(path))


def test_no_output_path_keeps_a_credential(file_host: FileHost, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    lora = kohya_lora(tmp_path / "src.safetensors").read_bytes()
    file_host.blobs["style.safetensors"] = Blob(lora, etag='"s"', drop_at=[2000, 10000])
    url = secret_url(file_host, "style.safetensors")
    work = tmp_path / "work"
    library = work / "ComfyUI"
    assert run_cli(capsys, "library", "init", str(library), "--layout", "comfyui")[0] == 0

    # a run that gives up leaves its resume state on disk; its messages name the source
    code, out, err = run_cli(capsys, "download", url, "--library", str(library), "--retries", "1")
    assert code == 1 and "gave up" in err
    assert_no_secret(out + err, "output of a run that gave up")
    [state] = (library / ".sdkit" / "downloads").glob("*.part.json")
    assert json.loads(state.read_text())["url"].endswith(f"&oauth_signature={REDACTED}&api%5Fkey={REDACTED}")
    assert_no_secret_on_disk(work)

    # the rerun resumes through a retry (messages on stderr), installs, indexes, prints JSON
    code, out, err = run_cli(capsys, "download", url, "--library", str(library), "--json")
    assert code == 0, err
    assert "retrying" in err and "keep=this" in json.loads(out)[0]["source"]
    assert_no_secret(out + err, "download --json")
    code, out, err = run_cli(capsys, "library", "ls", "--library", str(library), "--json")
    assert code == 0 and json.loads(out)[0]["source"].startswith(f"http://{REDACTED}@127.0.0.1:")
    assert_no_secret(out + err, "library ls")
    assert_no_secret_on_disk(work)  # the index (and its WAL) included

    # human output, into a folder
    code, out, err = run_cli(capsys, "download", url, "-o", str(work / "plain"))
    assert code == 0 and "downloaded" in out
    assert_no_secret(out + err, "human output")

    # a failing server whose error text echoes the URL it refused
    file_host.statuses["style.safetensors"] = [(403, {"X-Error-Message": f"bad signature for {url}"})]
    code, out, err = run_cli(capsys, "download", url, "-o", str(work / "denied"))
    assert code == 1 and len(err.splitlines()) == 1 and "HTTP 403" in err and "bad signature" in err
    assert_no_secret(out + err, "server error")

    # a URL that requests itself refuses (its exception text holds the whole URL)
    bad_port = url.replace(file_host.server.origin.split("//")[1], "127.0.0.1:99999")
    code, out, err = run_cli(capsys, "download", bad_port, "-o", str(work / "bad"))
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert_no_secret(out + err, "refused URL")
    assert_no_secret_on_disk(work)
