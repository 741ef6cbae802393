"""Fetching a file another node serves: ``ocpp-router fetch`` and ``POST /fetch``.

The file crosses the overlay as a channel (router/channels/service.py) whose far side is
the served file and whose near side is a part file in this node's ``[channels]
files_dir`` (router/channels/files.py). A broken route ends the channel; the fetch asks
again from the size of the part, and renames it only when the SHA-256 the far node
announced matches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from router.channels.channel import Refused
from router.channels.files import FileProblem, FileSink, inside, sha256_of
from router.channels.service import ChannelService, why
from router.logs import log_event

log = logging.getLogger("router.channels")

MAX_FETCHES = 4  # fetches at once
MAX_FILE_BYTES = 8 * 2**30  # a file this node fetches, at most


async def fetch(service: ChannelService, node: str, name: str, out: str, *,
                timeout_s: float = 600.0, retry_s: float = 1.0) -> dict[str, Any]:
    """Fetch the file ``name`` that ``node`` serves into ``out`` in this node's
    ``files_dir``; returns what happened (``ok``, ``bytes``, ``sha256``, ...).

    Bytes go to ``out.part`` as they arrive. When the channel ends early (a route
    lost, the far node restarting) the fetch asks again from the size of the part,
    until ``timeout_s``; once all bytes are there, their SHA-256 must be the one the
    far node announced, and the part becomes ``out``. A part whose digest is wrong
    (the file changed on the far node) is fetched again from the start, once. At most
    MAX_FETCHES run at once, one per ``out``; a file above MAX_FILE_BYTES is refused.
    """
    files_dir = service.settings.files_dir
    if files_dir is None:
        return {"ok": False, "error": "this node has no [channels] files_dir"}
    try:
        final = inside(files_dir, out)
    except FileProblem:
        return {"ok": False, "error": "out must name a file inside files_dir"}
    if final in service.fetching or len(service.fetching) >= MAX_FETCHES:
        return {"ok": False, "error": f"a fetch into {out} is under way, or "
                                      f"{MAX_FETCHES} fetches are"}
    service.fetching.add(final)
    log_event(log, logging.INFO, "fetch_started", far_node=node, file=name, out=out)
    progress = {"attempts": 0, "received": 0}
    try:
        with trio.move_on_after(timeout_s):
            result = await _fetch(service, node, name, out, final, progress, retry_s)
        if not result:
            result = {"ok": False, "error": f"not complete within {timeout_s:g} s"}
    except OSError as exc:
        result = {"ok": False, "error": f"cannot write {out}: {why(exc)}"}
    finally:
        service.fetching.discard(final)
    result = {**result, **progress}
    log_event(log, logging.INFO if result["ok"] else logging.WARNING,
              "fetch_done" if result["ok"] else "fetch_failed", far_node=node,
              file=name, out=out, **result)
    return result

async def _fetch(service: ChannelService, node: str, name: str, out: str, final: Path,
                 progress: dict[str, int], retry_s: float) -> dict[str, Any]:
    part = final.with_name(final.name + ".part")
    await trio.to_thread.run_sync(lambda: final.parent.mkdir(parents=True, exist_ok=True))
    started = trio.current_time()
    restarted = False
    what = f"file {name}"[:100]
    while True:
        progress["attempts"] += 1
        offset = part.stat().st_size if part.exists() else 0
        sink = FileSink(part, MAX_FILE_BYTES)
        try:
            opened = await service.request(node, f"fetch:{out}", what,
                                           {"file": name, "offset": offset}, sink)
            if isinstance(opened, Refused):
                if opened.by != "here":  # the far node said no: asking again changes nothing
                    return {"ok": False, "error": f"refused by {opened.by}: {opened.why}"}
            else:
                channel, body = opened
                size, digest = body.get("size"), body.get("sha256")
                if (type(size) is not int or type(digest) is not str
                        or not offset <= size <= MAX_FILE_BYTES):
                    service.end(channel, "the answer's size or digest is unusable", tell=True)
                    del service.channels[channel.key]
                    return {"ok": False, "error": f"{node} announced a size of {size!r} "
                            f"(at most {MAX_FILE_BYTES}) and a digest of {digest!r}"}
                sink.limit = size - offset
                await service.run_channel(channel)
        finally:
            await sink.aclose()
        progress["received"] += sink.written
        if not isinstance(opened, Refused) and sink.complete:
            if await trio.to_thread.run_sync(sha256_of, part) == digest:
                await trio.to_thread.run_sync(part.replace, final)
                return {"ok": True, "bytes": size, "sha256": digest,
                        "seconds": round(trio.current_time() - started, 3)}
            part.unlink()
            if restarted:
                return {"ok": False, "error": "the SHA-256 did not match twice"}
            restarted = True
            continue
        await trio.sleep(retry_s)
