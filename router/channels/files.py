"""Files as the far side of a channel: one node serves files from its ``[channels]
files_dir``, another fetches them into its own, resuming where a broken route left off
and checking the SHA-256 the server announced.

:class:`FileSource` and :class:`FileSink` stand where a tunnel has its TCP connection,
so a file crosses the overlay with the same frames and flow control as a tunnel's bytes
(router/channels/service.py). Disk reads and writes run in trio's worker threads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import trio

READ_BYTES = 64 * 1024


class FileProblem(Exception):
    """A requested file cannot be served (the reason is the CALLERROR description)."""


def inside(files_dir: Path, name: str) -> Path:
    """The path ``name`` names inside ``files_dir`` (it need not exist); raises FileProblem
    for anything else (an absolute path, ``..``, a link out of the directory)."""
    if not name or len(name) > 255 or name.startswith("/") or "\x00" in name:
        raise FileProblem("file must be a relative path of 1-255 characters")
    root = files_dir.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, ValueError) as exc:
        raise FileProblem(f"file cannot be resolved: {exc}") from None
    if not path.is_relative_to(root) or path == root:
        raise FileProblem("file must name a file inside the node's files_dir")
    return path


def resolve(files_dir: Path, name: str) -> Path:
    """The existing file ``name`` names inside ``files_dir`` (see :func:`inside`)."""
    path = inside(files_dir, name)
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise FileProblem(f"no such file: {name[:100]}")
    return path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's content (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Digests:
    """SHA-256 of served files, computed once per content (size and modification time),
    in a worker thread; at most 64 remembered."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._running: dict[tuple[str, int, int], trio.Event] = {}  # one hash per content

    async def of(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        while (running := self._running.get(key)) is not None:
            await running.wait()  # another open of the same file hashes it already
        digest = self._known.get(key)
        if digest is None:
            self._running[key] = done = trio.Event()
            try:
                digest = await trio.to_thread.run_sync(sha256_of, path)
            finally:
                del self._running[key]
                done.set()
            if len(self._known) >= 64:
                self._known.clear()
            self._known[key] = digest
        return digest


class FileSource(trio.abc.Stream):
    """A file read from ``offset`` to its end, as the TCP side of a serving channel."""

    end_reason = "end of file"

    def __init__(self, path: Path, offset: int) -> None:
        self._file: BinaryIO = path.open("rb")
        self._file.seek(offset)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await trio.to_thread.run_sync(self._file.read, min(max_bytes or READ_BYTES,
                                                                   READ_BYTES))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("a file being served takes no data")

    async def wait_send_all_might_not_block(self) -> None:
        return

    async def aclose(self) -> None:
        self._file.close()
        await trio.lowlevel.checkpoint()


class FileSink(trio.abc.Stream):
    """A partial file appended to, as the TCP side of a fetching channel; it sends nothing."""

    def __init__(self, path: Path, limit: int) -> None:
        self._file: BinaryIO = path.open("ab")
        self.written = 0
        self.limit = limit  # the bytes still due: a server sending more is cut off

    @property
    def complete(self) -> bool:
        """Every byte due was written."""
        return self.written >= self.limit

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()  # a fetch sends no data: the channel ends from the far end
        raise AssertionError("unreachable")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.written + len(data) > self.limit:
            raise trio.BrokenResourceError("more bytes than the file's announced size")
        await trio.to_thread.run_sync(self._file.write, data)
        self.written += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        return

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._flush_and_close)

    def _flush_and_close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
