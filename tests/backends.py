"""Real production backends for the integration tests: a throw-away PostgreSQL cluster (Debian's
``postgresql`` package) and an ``mlflow server`` on it, each started in a temporary directory on a free
loopback port and stopped afterwards."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl`` (Debian keeps them out of PATH), or None."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as root, the cluster belongs to the package's postgres user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    port: int
    user: str

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        # The driver named: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, and Dagster's NOTIFY needs
        # psycopg2's client-side parameters.
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, bindir: Path) -> None:
        cmd = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name]
        subprocess.run(_as_cluster_owner(cmd), check=True, capture_output=True, text=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[Postgres, Path]]:
    """A new cluster (trust authentication on loopback only) in a temporary directory; removed afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="shapegrpo-pg-"))
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    try:
        init = [str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"]
        subprocess.run(_as_cluster_owner(init), check=True, capture_output=True, text=True)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
        start = [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(root / "log"),
            "-w",
            "start",
        ]
        subprocess.run(_as_cluster_owner(start), check=True, capture_output=True, text=True, timeout=60)
        yield Postgres(port=port, user=user), bindir
    finally:
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(_as_cluster_owner(stop), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifact_root: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port with this backend store; yields its tracking URI."""
    port = free_port()
    log_path = artifact_root.parent / "mlflow-server.log"
    log = open(log_path, "w")  # closed below
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    cmd += ["--default-artifact-root", str(artifact_root), "--serve-artifacts", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()}") from None
                time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()
