"""A throwaway PostgreSQL server for the shared cache tests (no mock database).

The Debian server binaries (``initdb``, ``pg_ctl``: package ``postgresql``, which
``.ci/run`` and the README's test command install) refuse to run as root, so as
root the server runs as ``nobody``: its data directory and Unix socket live in a
fresh directory under /tmp that ``nobody`` owns. It listens on the socket only
(no TCP port), and asks for the password (``scram-sha-256``): user ``solver``,
password :data:`PASSWORD`, so that the credential tests use a real one. Stopping it goes
through ``pg_ctl`` (which signals the postmaster by the PID in its pid file).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "s3cr3t-Pa55word"
"""In every URL the tests use: it must never show up in output, errors or logs."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        which = shutil.which("pg_ctl")
        if which is None:
            pytest.fail(
                "the PostgreSQL server binaries are missing: install the Debian package "
                "'postgresql' (.ci/run and the README's test command do)"
            )
        return Path(which).parent
    return Path(found[-1]).parent


@dataclass
class PgServer:
    base: Path
    bindir: Path
    user: tuple[int, int] | None

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user[0], "group": self.user[1], "extra_groups": []}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            argv, capture_output=True, text=True, check=check, cwd=self.base, timeout=60,
            **kwargs,
        )

    def init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.user is not None:
            os.chown(pwfile, *self.user)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "solver",
                  "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        pwfile.unlink()

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.base / "server.log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                  "stop", check=False)

    def url(self, db: str = "postgres", *, password: bool = True) -> str:
        auth = f"solver:{PASSWORD}" if password else "solver"
        return f"postgresql://{auth}@/{db}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.url(name)


def start_server() -> PgServer:
    base = Path(tempfile.mkdtemp(prefix="solver-pg-"))
    user: tuple[int, int] | None = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user = (nobody.pw_uid, nobody.pw_gid)
        os.chown(base, *user)
    base.chmod(0o700)
    server = PgServer(base, _bindir(), user)
    server.init()
    server.start()
    return server


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def shared_url(pg_server: PgServer) -> str:
    """The URL (with a password) of a fresh database on the module's server."""
    return pg_server.new_database()
