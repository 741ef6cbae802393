"""nginx as a plain WebSocket reverse proxy: the forwarding benchmark's `nginx` baseline.

``find_nginx()`` returns the binary, installing Debian's package with apt-get when it
is missing (as root, non-interactive, ``apt-get update`` only if the first install
fails). ``start_nginx()`` writes a config into a work directory (pid file, lock file,
error log and temp paths all live there), starts nginx in the foreground
(``daemon off``, a master and one worker) and waits until its port accepts
connections. Nothing under /etc or /var is read or written.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchutil import stop_process

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
lock_file {dir}/nginx.lock;
error_log {dir}/error.log warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_connect_timeout 10s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def _run(argv: list[str]) -> str | None:
    """Run an apt-get step; None when it succeeded, else a one-line reason."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(argv)}` failed: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`{' '.join(argv)}` failed (exit {done.returncode}): {tail[0]}"
    return None


def _which() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_nginx(install: bool = True) -> tuple[str | None, str]:
    """(path to the nginx binary, "") or (None, why it cannot be had)."""
    found = _which()
    if found or not install:
        return found, "" if found else "no nginx binary on PATH"
    if shutil.which("apt-get") is None:
        return None, "no nginx binary and no apt-get to install it"
    if os.geteuid() != 0:
        return None, "no nginx binary, and installing it with apt-get needs root"
    install_argv = ["apt-get", "install", "-y", "nginx"]
    reason = _run(install_argv)
    if reason is not None:
        reason = _run(["apt-get", "update"]) or _run(install_argv)
    if reason is not None:
        return None, reason
    found = _which()
    return (found, "") if found else (None, "apt-get installed nginx but no nginx binary found")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NginxProcess:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def error_log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.workdir / "error.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM is nginx's fast shutdown: the master stops its workers, then exits."""
        stop_process(self.proc)


def start_nginx(binary: str, backend_port: int, workdir: Path, connections: int) -> NginxProcess:
    """Start nginx proxying 127.0.0.1:<free port> to the backend; wait until it accepts.

    ``connections`` is the number of simultaneous proxied links needed. Each takes two
    of nginx's worker connections, and once fewer than 1/16 of them are free nginx
    starts closing connections still waiting for their request ("reusing
    connections"), so the pool is sized with ample headroom.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(CONFIG.format(
        dir=workdir, port=port, backend_port=backend_port,
        connections=4 * connections + 1024, nofile=4 * connections + 2048,
    ))
    proc = subprocess.Popen(
        [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nginx = NginxProcess(proc=proc, port=port, workdir=workdir)
    deadline = time.monotonic() + 20.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with code {proc.returncode}:\n"
                               + nginx.error_log_tail())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return nginx
        except OSError:
            if time.monotonic() >= deadline:
                nginx.stop()
                raise RuntimeError("nginx did not accept connections within 20 s:\n"
                                   + nginx.error_log_tail()) from None
            time.sleep(0.05)
