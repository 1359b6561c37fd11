"""The hashes the WebUIs and Civitai show for a model file, in one read pass.

- `sha256`: of the whole file (A1111 "new" hash; Civitai SHA256), `autov2` its first 10 hex;
- `legacy`: A1111's old model hash (Civitai AutoV1): sha256 of the 64 KiB at offset 1 MiB,
  first 8 hex; a shorter file hashes whatever bytes lie there, possibly none, as A1111 does;
- `autov3` (safetensors only): sha256 of everything after the 8+N header bytes (kohya's
  addnet hash), first 12 hex as Civitai shows it, and `addnet_full`, all 64 hex.
The file is read once in 16 MiB chunks; the whole-file and after-header digests run in
two threads of their own (hashlib releases the GIL on large updates) while the reader
fills the next buffer, so on two free cores hashing a safetensors file costs the wall
time of a single sha256. Folders (diffusers) get no hashes: all None.

A file hashed before and unchanged since is answered from the hash cache
(`sdkit.io.hash_cache`) without being read.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO, Callable

from sdkit.errors import SdkitError
from sdkit.io.hash_cache import remembered_digests
from sdkit.io.safetensors_header import MAX_HEADER_SIZE
from sdkit.io.safetensors_reader import SAFETENSORS_SUFFIXES

CHUNK_BYTES = 16 << 20
RING_BUFFERS = 3  # chunks the reader may run ahead of the slowest digest
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class Hashes:
    """Lowercase hex digests (Civitai shows them uppercase); None where not applicable."""

    sha256: str | None
    autov2: str | None
    legacy: str | None
    autov3: str | None
    addnet_full: str | None


NO_HASHES = Hashes(None, None, None, None, None)
HASH_NAMES = tuple(field.name for field in fields(Hashes))


def _tensor_data_start(file: BinaryIO, size: int) -> int | None:
    """8+N for a file whose first 8 bytes give a plausible header length N."""
    prefix = file.read(8)
    file.seek(0)
    if len(prefix) < 8:
        return None
    header_size = int.from_bytes(prefix, "little")
    if header_size > MAX_HEADER_SIZE or 8 + header_size > size:
        return None
    return 8 + header_size


class _DigestThread(threading.Thread):
    """Digests the file from byte `start` on, fed chunk by chunk through a queue.

    Each digest runs at its own pace, a few chunks behind the reader, acknowledging each
    chunk when done, so that a thread briefly descheduled on a busy machine does not
    stall the others.
    """

    def __init__(self, start: int) -> None:
        super().__init__(daemon=True)
        self.start_offset = start
        self.digest = hashlib.sha256()
        self.chunks: queue.Queue[memoryview | None] = queue.Queue()
        self.done: queue.Queue[None] = queue.Queue()

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.digest.update(chunk)
            self.done.put(None)


def _window(chunk: memoryview, position: int) -> memoryview:
    """The part of a chunk inside A1111's legacy hash window."""
    begin = max(LEGACY_OFFSET, position)
    end = min(LEGACY_OFFSET + LEGACY_LENGTH, position + len(chunk))
    return chunk[max(0, begin - position):max(0, end - position)]


def _read_and_hash(file: BinaryIO, digests: list[_DigestThread], legacy: "hashlib._Hash",
                   progress: Callable[[int], None] | None) -> None:
    """Read the file through a ring of buffers, queueing every chunk to the digests."""
    buffers = [memoryview(bytearray(CHUNK_BYTES)) for _ in range(RING_BUFFERS)]
    position, in_flight = 0, 0
    for sequence in itertools.count():
        if in_flight == RING_BUFFERS:  # the oldest buffer is reused once every digest had it
            for digest in digests:
                digest.done.get()
            in_flight -= 1
        buffer = buffers[sequence % RING_BUFFERS]
        count = file.readinto(buffer)
        if not count:
            return
        chunk = buffer[:count]
        for digest in digests:
            digest.chunks.put(chunk[max(0, digest.start_offset - position):])
        legacy.update(_window(chunk, position))
        in_flight += 1
        position += count
        if progress is not None:
            progress(count)


def _hash_open_file(file: BinaryIO, size: int, is_safetensors: bool,
                    progress: Callable[[int], None] | None) -> Hashes:
    data_start = _tensor_data_start(file, size) if is_safetensors else None
    digests = [_DigestThread(0)] + ([] if data_start is None else [_DigestThread(data_start)])
    legacy = hashlib.sha256()
    for digest in digests:
        digest.start()
    try:
        _read_and_hash(file, digests, legacy, progress)
    finally:
        for digest in digests:
            digest.chunks.put(None)
        for digest in digests:
            digest.join()
    sha256 = digests[0].digest.hexdigest()
    addnet = digests[1].digest.hexdigest() if data_start is not None else None
    return Hashes(sha256=sha256, autov2=sha256[:10], legacy=legacy.hexdigest()[:8],
                  autov3=addnet[:12] if addnet else None, addnet_full=addnet)


def _read_hashes(path: Path, progress: Callable[[int], None] | None) -> Hashes:
    try:
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            is_safetensors = path.suffix.lower() in SAFETENSORS_SUFFIXES
            return _hash_open_file(file, size, is_safetensors, progress)
    except FileNotFoundError:
        raise SdkitError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise SdkitError(f"{path}: cannot read: {exc.strerror or exc}") from None


def hash_file(path: str | os.PathLike[str], *,
              progress: Callable[[int], None] | None = None) -> Hashes:
    """All hashes of a file in one pass; `progress(n)` after each chunk of n bytes (once,
    with the whole size, when the hash cache already knows the file)."""
    path = Path(path)
    if path.is_dir():
        return NO_HASHES
    digests = remembered_digests(path, HASH_NAMES, lambda: asdict(_read_hashes(path, progress)), progress)
    return Hashes(**{name: digests[name] for name in HASH_NAMES})
