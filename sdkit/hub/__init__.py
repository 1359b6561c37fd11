"""Downloads from Hugging Face, Civitai and plain URLs (resumable, verified), and model
libraries in the A1111 / ComfyUI / InvokeAI-like layouts with a SQLite index."""

from sdkit.hub.civitai import CivitaiClient, FileChoice
from sdkit.hub.fetch import DownloadOutcome, Resolved, download, resolve_source
from sdkit.hub.http import RetryPolicy
from sdkit.hub.placement import POLICIES, Policy
from sdkit.hub.transfer import RemoteFile, TransferOptions, TransferProgress, transfer

__all__ = [
    "POLICIES", "CivitaiClient", "DownloadOutcome", "FileChoice", "Policy", "RemoteFile",
    "Resolved", "RetryPolicy", "TransferOptions", "TransferProgress", "download",
    "resolve_source", "transfer",
]
