"""Prefect flows: orchestration only. Each flow runs as `python -m flows.NAME --help`.

Embedded defaults are set here, before Prefect or Ray is imported, so a bare
`python -m flows.anonymize` runs offline with an ephemeral Prefect server and a local Ray.
Anything already set in the environment (PREFECT_API_URL for a real server, RAY_ADDRESS
for a cluster) wins. A command-line run of a data-path flow starts that server here, so that
it comes up while the rest is imported (`flows/prefect_server.py`).
"""
import os
import sys
from pathlib import Path

_DEFAULTS = {
    # Keep Prefect's database and logs inside the working directory, never in ~/.prefect.
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    # Telemetry would try DNS on every run; this machine class has no network.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server takes 20-26 s to start here; the 20 s default timed out.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
if not sys.stderr.isatty():
    # Ray paints each forwarded worker line's "(FaceWorkerImpl pid=...)" prefix in ANSI
    # colour even into a file or a journal; 0 turns the colour off (the prefix stays).
    _DEFAULTS["RAY_COLOR_PREFIX"] = "0"
for _name, _value in _DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from flows import prefect_server  # noqa: E402 (after the defaults, which the server inherits)

prefect_server.start_for_command_line()
