"""Prefect's temporary server, started before anything heavy is imported.

With no PREFECT_API_URL, Prefect starts a temporary server of its own at the first flow call
and waits for it: 7 s here with its database in place, 13 s on a new one, after our imports
(4 s) and Ray (3.5 s). A command-line run of a data-path flow (`COMMANDS`) starts the same
server from `flows/__init__.py` instead, before torch, Ray or Prefect is imported, so that it
comes up while they load: the command and environment of Prefect's own temporary server
(`prefect.server.api.server.SubprocessASGIServer`, prefect 3.9.1), and PREFECT_API_URL set to
it before Prefect reads its settings. The flow's `main` calls `wait_until_ready()` before
the flow runs; the server stops when the process exits, as Prefect's would.

Standard library only: this runs before anything else is imported.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# The flows whose `main` waits for the server (any other flow lets Prefect start its own).
COMMANDS = frozenset({"flows.anonymize", "flows.reconstruct", "flows.roundtrip"})

_server: subprocess.Popen | None = None
_url = ""


def command_line_module(argv: list[str]) -> str | None:
    """The module of `python -m MODULE ...` in the interpreter's own argv, else None."""
    for i, arg in enumerate(argv[1:-1], start=1):
        if arg == "-m":
            return argv[i + 1]
        if not arg.startswith("-"):
            return None  # a script or `-c`: not run as a module
    return None


def start_for_command_line() -> None:
    """Start the server now when this process is `python -m` one of `COMMANDS` without a
    configured Prefect API (nor --help, which runs no flow)."""
    argv = getattr(sys, "orig_argv", [])
    if command_line_module(argv) not in COMMANDS or os.environ.get("PREFECT_API_URL"):
        return
    if {"-h", "--help"} & set(argv):
        return
    start()


def start() -> str:
    """Start the temporary server on a free local port; set and return PREFECT_API_URL."""
    global _server, _url
    prefect_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
    # The socket is bound here, on a port the kernel picks, and handed to the server: no other
    # process can take the port between the pick and the server's start.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        port = listening.getsockname()[1]
        _server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--fd", str(listening.fileno()),
             "--log-level", "error", "--lifespan", "on"],
            pass_fds=(listening.fileno(),),
            # What Prefect sets for its temporary server: no UI, only the services it needs.
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"})
    _url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = _url
    # It serves no UI: without this every flow run would log a "View at" link to nowhere.
    os.environ.setdefault("PREFECT_UI_URL", "")
    atexit.register(stop)
    return _url


def wait_until_ready(timeout_s: float | None = None) -> None:
    """Block until the server `start` launched answers its health check (no-op if none was started)."""
    if _server is None:
        return
    timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _server.poll() is not None:
            raise RuntimeError(f"Prefect's temporary server ({_url}) exited with status {_server.returncode} "
                               "before it answered; its error is above")
        try:
            with urllib.request.urlopen(f"{_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Prefect's temporary server ({_url}) did not answer within {timeout_s:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")


def stop() -> None:
    global _server
    if _server is None:
        return
    _server.terminate()
    try:
        _server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _server.kill()
        _server.wait()
    _server = None
