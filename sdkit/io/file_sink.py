"""Where the writer's bytes go: straight to the disk, or through the page cache.

Writing through the page cache first copies every byte into freshly allocated cache
pages, then the final fsync waits for the disk anyway. The copy is not free: on
virtual machines whose host takes back free guest memory, each new page faults in
the host too (2 GiB took 1 to 14 s to copy into the cache on such a machine, where
the disk then stored it in 1.3 s). `DirectSink` opens the file with O_DIRECT
instead: bytes are gathered into two page-aligned staging buffers, which a thread of
their own writes to the disk in turn, so one fills while the other is stored and
memory is never newly allocated. The tail is padded to a whole block and the file
cut back to its length. Where O_DIRECT is refused (tmpfs, other systems),
`BufferedSink` writes through the page cache, copies unchanged tensors in the kernel
(`copy_file_range`: a reflink on file systems that have them) and asks for early
write-out (`sdkit.io.writeback`).

Both write from offset 0 of a new file; `finish()` puts every byte in the file (the
caller then fsyncs); `close()` releases the sink whether or not it finished. Given a
`DataDigest`, a sink also hashes the bytes it writes past the digest's start (the
safetensors data section, for ModelSpec's `hash_sha256`): the direct sink on its disk
thread, while the next buffer fills.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from sdkit.io.byte_span import ByteSpan, copy_span, read_into
from sdkit.io.writeback import EarlyWriteback

BLOCK = 4096  # O_DIRECT offsets, lengths and addresses are multiples of this
STAGING = 32 << 20  # bytes per staging buffer (two of them)
_HASH_READ = 16 << 20  # bytes read at a time to hash a span the kernel copies


class DataDigest:
    """sha256 of the bytes a sink writes from file offset `start` on."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.sha256 = hashlib.sha256()

    def written(self, data: memoryview, offset: int) -> None:
        """`data` was written at file `offset` (calls come in file order)."""
        skip = max(0, self.start - offset)
        if skip < len(data):
            self.sha256.update(data[skip:])  # releases the GIL for large buffers

    def copied(self, span: ByteSpan, offset: int) -> None:
        """The span's bytes went to file `offset` without passing through us: read them."""
        buffer = bytearray(min(_HASH_READ, span.length))
        done = 0
        while done < span.length:
            view = memoryview(buffer)[:min(len(buffer), span.length - done)]
            read_into(span, done, view)
            self.written(view, offset + done)
            done += len(view)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class BufferedSink:
    """Writes through a buffered file object (the page cache)."""

    def __init__(self, file: IO[bytes], digest: DataDigest | None = None) -> None:
        self.file = file
        self.position = 0
        self.digest = digest
        self.writeback = EarlyWriteback(file.fileno())

    def write(self, data: Any) -> int:
        """Append `data` (anything with the buffer protocol); returns its size."""
        view = memoryview(data).cast("B")
        self.file.write(view)
        if self.digest is not None:
            self.digest.written(view, self.position)
        self._advance(len(view))
        return len(view)

    def copy(self, span: ByteSpan) -> int:
        self.file.flush()  # the kernel appends at the descriptor's position: nothing may be buffered
        copy_span(span, self.file.fileno())
        if self.digest is not None:
            self.digest.copied(span, self.position)
        self._advance(span.length)
        return span.length

    def _advance(self, count: int) -> None:
        self.position += count
        if self.writeback.due(self.position):
            self.file.flush()
            self.writeback.written_to(self.position)

    def finish(self) -> None:
        self.file.flush()

    def close(self) -> None:
        pass


class DirectSink:
    """Writes a file opened with O_DIRECT from two staging buffers, on its own thread; a
    digest of the bytes is made on another, beside the write (a sha256 pass takes about
    as long as the write itself)."""

    def __init__(self, fileno: int, staging: int | None = None,
                 digest: DataDigest | None = None) -> None:
        self.fileno = fileno
        self.digest = digest
        size = staging or STAGING
        self.buffers = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
        self.current = 0  # the buffer being filled
        self.filled = 0  # bytes in it
        self.stored = 0  # file offset where it goes
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sdkit-disk")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="sdkit-hash") if digest is not None else None
        self.pending: list[Future[None]] = []

    def write(self, data: Any) -> int:
        source = memoryview(data).cast("B")
        done = 0
        while done < len(source):
            buffer = self.buffers[self.current]
            count = min(len(source) - done, len(buffer) - self.filled)
            buffer[self.filled:self.filled + count] = source[done:done + count]
            done += count
            self._filled(count)
        return done

    def copy(self, span: ByteSpan) -> int:
        done = 0
        while done < span.length:
            buffer = self.buffers[self.current]
            count = min(span.length - done, len(buffer) - self.filled)
            read_into(span, done, memoryview(buffer)[self.filled:self.filled + count])
            done += count
            self._filled(count)
        return done

    def _filled(self, count: int) -> None:
        self.filled += count
        if self.filled == len(self.buffers[self.current]):
            self._store(self.filled)

    def _store(self, length: int, padding: int = 0) -> None:
        """Hand the current buffer to the disk thread and go on filling the other one."""
        self._wait()  # the other buffer's write has ended: it is free again
        buffer = memoryview(self.buffers[self.current])[:length + padding]
        self.pending = [self.pool.submit(_pwrite_all, self.fileno, buffer, self.stored)]
        if self.hasher is not None and self.digest is not None:  # in file order: one thread
            self.pending.append(self.hasher.submit(self.digest.written, buffer[:length], self.stored))
        self.stored += length + padding
        self.current = 1 - self.current
        self.filled = 0

    def _wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:  # both awaited, whichever fails
            future.exception()
        for future in pending:
            future.result()

    def finish(self) -> None:
        size = self.stored + self.filled
        tail = -self.filled % BLOCK  # O_DIRECT writes whole blocks: pad, then cut the file back
        if self.filled:
            self.buffers[self.current][self.filled:self.filled + tail] = bytes(tail)
            self._store(self.filled, tail)
        self._wait()
        os.ftruncate(self.fileno, size)

    def close(self) -> None:
        try:
            self._wait()
        except OSError:
            pass  # the failure that brought us here is already on its way up
        finally:
            self.pool.shutdown(wait=True)
            if self.hasher is not None:
                self.hasher.shutdown(wait=True)
            for buffer in self.buffers:
                try:
                    buffer.close()
                except BufferError:
                    pass  # a failed write's traceback still views it: freed with that


def _pwrite_all(fileno: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fileno, data[done:], offset + done)
        except OSError as exc:
            # a file system that took O_DIRECT at open but refuses its writes: go on buffered
            if exc.errno != errno.EINVAL or not _drop_direct(fileno):
                raise


def _drop_direct(fileno: int) -> bool:
    import fcntl

    flags = fcntl.fcntl(fileno, fcntl.F_GETFL)
    if not flags & os.O_DIRECT:
        return False
    fcntl.fcntl(fileno, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


def open_sink(path: os.PathLike[str] | str, digest: DataDigest | None = None
              ) -> tuple[IO[bytes], BufferedSink | DirectSink]:
    """Create `path` and a sink writing to it (hashing into `digest` when given): direct
    where the file system allows it (SDKIT_DIRECT_IO=off: never). `path` must be a new,
    unique name (a partial file's). The caller closes both, the sink first."""
    if hasattr(os, "O_DIRECT") and os.environ.get("SDKIT_DIRECT_IO") != "off":
        try:
            fileno = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # refused (tmpfs and others; the file may exist by now): through the page cache
            file = open(path, "wb")
            return file, BufferedSink(file, digest)
        return os.fdopen(fileno, "wb", buffering=0), DirectSink(fileno, digest=digest)
    file = open(path, "xb")
    return file, BufferedSink(file, digest)
