"""Headless Chromium for the end-to-end tests of the admin pages.

:func:`chromium_binary` finds Debian's chromium (installing it with apt-get when missing,
skipping only if that fails); :func:`run_chromium` runs it once with a fresh profile,
for ``--dump-dom`` or ``--screenshot``; :func:`png_size` reads a screenshot's size;
:func:`parse` reads a dumped DOM back (elements, their text, table rows).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                   "--window-size=1200,800"]


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when missing; skips only if that fails."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                     "chromium"])
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"chromium is not installed and `{' '.join(argv)}` failed: {exc}")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"chromium is not installed and `{' '.join(argv)}` failed "
                        f"(exit {done.returncode}): {tail[0]}")
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def run_chromium(binary: str, tmp_path: Path, args: list[str]) -> str:
    """Run headless Chromium once with a fresh profile; returns its stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    done = subprocess.run([binary, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class Dom(HTMLParser):
    """What the tests read of a serialised page: elements with their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        texts: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, texts))
        if tag not in ("meta", "br", "img", "link", "input", "hr", "circle", "rect", "line"):
            self._open.append(texts)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("circle", "rect", "line"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for texts in self._open:
            texts.append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        return [(a, "".join(t).strip()) for name, a, t in self.elements
                if name == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def rows(self, body_id: str) -> list[list[str]]:
        """The cells of a table body, row by row."""
        out: list[list[str]] = []
        inside = False
        for name, attrs, texts in self.elements:
            if name in ("table", "thead", "tbody"):
                inside = name == "tbody" and attrs.get("id") == body_id
            elif inside and name == "tr":
                out.append([])
            elif inside and name == "td" and out:
                out[-1].append("".join(texts).strip())
        return out


def parse(page: str) -> Dom:
    dom = Dom()
    dom.feed(page)
    return dom


def rate_pair(text: str) -> tuple[float, float]:
    m = re.fullmatch(r"in ([0-9.]+)/s, out ([0-9.]+)/s", text)
    assert m is not None, f"not a rate label: {text!r}"
    return float(m[1]), float(m[2])
