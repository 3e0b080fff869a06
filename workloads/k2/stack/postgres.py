"""PostgreSQL from the Debian packages: the Iceberg SQL catalog of the local stack.

The cluster lives under the service home and belongs to the `postgres` system user (PostgreSQL
refuses to run as root). It listens on 127.0.0.1 only, keeps its unix socket inside the data
folder rather than /var/run, and lets role `k2` in over TCP with a SCRAM password.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg2
import structlog
from psycopg2 import sql

from .base import Service, StackError, apt_install, run, state_dir

log = structlog.get_logger("k2.stack.postgres")

SYSTEM_USER = "postgres"
ROLE = "k2"


def _installed_bin_dirs() -> dict[int, Path]:
    """Server binaries of every installed major version, by major."""
    return {int(Path(initdb).parent.parent.name): Path(initdb).parent
            for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb")}


def _stop_packaged_clusters() -> None:
    """Stop clusters the Debian package may have started on 5432: we run our own, elsewhere."""
    listing = run(["pg_lsclusters", "--no-header"], what="pg_lsclusters").stdout
    for line in listing.splitlines():
        version, cluster, _port, status, *_ = line.split()
        if status == "online":
            run(["pg_ctlcluster", version, cluster, "stop"], what=f"stop cluster {version}/{cluster}")


def _traversable_by_others(path: Path) -> bool:
    return all(parent.stat().st_mode & 0o001 for parent in [path, *path.parents] if parent.exists())


@dataclass
class Postgres(Service):
    name: str = "postgres"
    port_env: str = "K2_POSTGRES_PORT"
    default_port: int = 55432
    start_timeout: float = 60.0

    @property
    def password(self) -> str:
        return os.environ.get("K2_POSTGRES_PASSWORD", "k2-dev-password")

    @property
    def database(self) -> str:
        return os.environ.get("K2_POSTGRES_DB", "k2_catalog")

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def home(self) -> Path:
        """The state folder, unless a parent of it is closed to other users (a checkout under
        /root, say): PostgreSQL runs as its own user, so its cluster then lives in a folder of
        /var/tmp named after the state folder, which keeps one cluster per checkout."""
        preferred = state_dir() / self.name
        if _traversable_by_others(state_dir()):
            preferred.mkdir(parents=True, exist_ok=True)
            return preferred
        digest = hashlib.sha1(str(state_dir()).encode()).hexdigest()[:12]
        fallback = Path("/var/tmp") / f"k2-postgres-{digest}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    @property
    def dsn(self) -> str:
        """libpq URL of the catalog database (psycopg2.connect, psql)."""
        return f"postgresql://{ROLE}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{self.database}"

    @property
    def sqlalchemy_url(self) -> str:
        return self.dsn.replace("postgresql://", "postgresql+psycopg2://", 1)

    def connect(self, dbname: str | None = None):
        return psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, password=self.password,
                                dbname=dbname or self.database, connect_timeout=3)

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if _installed_bin_dirs():
            return
        apt_install("postgresql")
        if not _installed_bin_dirs():
            raise StackError("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb appeared")
        _stop_packaged_clusters()

    def bin_dir(self) -> Path:
        """The binaries of the cluster's major version (newest installed one for a new cluster)."""
        installed = _installed_bin_dirs()
        if not installed:
            raise StackError("PostgreSQL server binaries are missing: run `apt-get install postgresql`")
        version_file = self.data_dir / "PG_VERSION"
        if not version_file.exists():
            return installed[max(installed)]
        major = int(version_file.read_text().strip())
        if major not in installed:
            raise StackError(f"the cluster in {self.data_dir} was made by PostgreSQL {major}, which is not "
                             f"installed: install postgresql-{major} or delete that folder")
        return installed[major]

    def prepare(self) -> None:
        shutil.chown(self.home, SYSTEM_USER, SYSTEM_USER)
        self._check_reachable()
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("postgres.initdb", data_dir=str(self.data_dir))
            # The bootstrap superuser `postgres` gets peer auth on the socket only; over TCP every
            # role needs a SCRAM password, and only `k2` is given one.
            self._as_postgres([str(self.bin_dir() / "initdb"), "-D", str(self.data_dir),
                               "--username", SYSTEM_USER, "--encoding", "UTF8", "--no-locale",
                               "--auth-local", "peer", "--auth-host", "scram-sha-256"], what="initdb")
        self._sync_role()

    def command(self) -> list[str]:
        return [str(self.bin_dir() / "postgres"), "-D", str(self.data_dir),
                "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                "-c", f"unix_socket_directories={self.data_dir}"]

    def run_as(self) -> str | None:
        return SYSTEM_USER

    def ready(self) -> bool:
        # closing(): psycopg2's own context manager only ends the transaction, never the connection.
        with closing(self.connect(dbname="postgres")) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)

    def after_ready(self) -> None:
        with closing(self.connect(dbname="postgres")) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
                    log.info("postgres.database_created", database=self.database)

    def request_stop(self, pid: int) -> None:
        # SIGINT is PostgreSQL's fast shutdown: it ends sessions instead of waiting for clients
        # to leave (SIGTERM, what the base class sends, is the smart mode that waits).
        log.info("postgres.fast_shutdown", pid=pid)
        os.kill(pid, signal.SIGINT)

    # helpers -----------------------------------------------------------------------------
    def _as_postgres(self, cmd: list[str], *, what: str, stdin: str | None = None) -> None:
        wrapped = ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--", *cmd]
        proc = subprocess.run(wrapped, input=stdin, capture_output=True, text=True, cwd=self.home, timeout=120)
        if proc.returncode != 0:
            raise StackError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")

    def _check_reachable(self) -> None:
        try:
            self._as_postgres(["test", "-w", str(self.home)], what="access check")
        except StackError as exc:
            raise StackError(f"the `{SYSTEM_USER}` user cannot write {self.home} (a parent folder is not "
                             f"traversable by others?): set K2_STATE_DIR to a folder it can reach") from exc

    def _sync_role(self) -> None:
        """Create role k2 and set its password from the environment, with the server stopped.

        Single-user mode needs no login, so a changed K2_POSTGRES_PASSWORD takes effect on the
        next start instead of locking the stack out of its own cluster.
        """
        if any(ch in self.password for ch in "\r\n"):
            raise StackError("K2_POSTGRES_PASSWORD must be a single line")
        literal = "'" + self.password.replace("'", "''") + "'"
        script = (f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
                  f"THEN CREATE ROLE {ROLE} LOGIN CREATEDB; END IF; END$$;\n"
                  f"ALTER ROLE {ROLE} PASSWORD {literal};\n")
        # Single-user mode reports SQL errors yet exits 0 unless exit_on_error is set; the
        # statement is kept out of the error output because it carries the password.
        self._as_postgres([str(self.bin_dir() / "postgres"), "--single", "-D", str(self.data_dir),
                           "-c", "exit_on_error=on", "-c", "log_min_error_statement=panic", "postgres"],
                          stdin=script, what="set the k2 role's password")
