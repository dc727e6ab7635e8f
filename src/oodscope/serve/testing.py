"""Helpers for testing the service on one machine, loopback only: a free port, a throwaway PostgreSQL
cluster, and ``oodscope serve`` as a child process that is always stopped.

:class:`PostgresCluster` runs Debian's PostgreSQL binaries (``/usr/lib/postgresql/*/bin``) in a temporary
directory, listening on 127.0.0.1 and a Unix socket in that directory only, with ``trust``
authentication; as root it runs them as the ``postgres`` user (PostgreSQL refuses to run as root).
:class:`ServiceProcess` starts ``python -m oodscope.cli.main serve ...`` and waits for ``/readyz``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``, or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


class PostgresCluster:
    """A throwaway PostgreSQL server on 127.0.0.1 (use as a context manager)."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install "
                                    "postgresql")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="oodscope-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise FileNotFoundError("running as root needs the 'postgres' system user (created by the Debian "
                                        "postgresql package)") from None
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.started = False

    def _run(self, args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self.user is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=self.root, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        made = self._run([self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                          "--no-sync"], timeout)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.strip() or made.stdout.strip()}")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c shared_buffers=16MB "
                   "-c max_connections=40 -c fsync=on -c synchronous_commit=on")
        started = self._run([self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t",
                             str(int(timeout)), "start"], timeout + 10)
        if started.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()} {log}")
        self.started = True
        return self

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.started:
            self._run([self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "30", "stop"], 40)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` (e.g. ``http://127.0.0.1:PORT/readyz``) until it answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout:g} s ({last})")


class ServiceProcess:
    """``oodscope serve ARGS --host 127.0.0.1 --port PORT`` as a child process (use as a context manager)."""

    def __init__(self, args: Sequence[str], *, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.args = [str(a) for a in args]
        self.env = env
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        command = [sys.executable, "-m", "oodscope.cli.main", "serve", *self.args, "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            wait_ready(self.url + "/readyz", timeout, self.process)
        except BaseException:
            self.kill()
            raise
        return self

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful: admitted requests are finished), then SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (``kill -9``)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log not in (None, subprocess.DEVNULL):
            with contextlib.suppress(OSError):
                self._log.close()
        self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


__all__ = ["PostgresCluster", "ServiceProcess", "free_port", "postgres_bin", "postgres_cluster", "wait_ready"]
