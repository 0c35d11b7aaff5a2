"""A private Postgres cluster and a private RabbitMQ node for the fault suite.

The suite stops and restarts its servers, so it never uses the machine's own ones (other work
runs against those). Each server here lives in a temp dir, listens on loopback on a free port
of its own, and is stopped and removed by ``close()`` (also after a failure or Ctrl-C: use them
as context managers).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql

from bench.ports import free_port

#: Where Debian keeps each Postgres version's server binaries.
POSTGRES_BINARIES = Path("/usr/lib/postgresql")
#: RabbitMQ's own scripts (the ones in /usr/sbin switch to the rabbitmq user and its cookie).
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
#: Longest wait for a server to start or stop.
START_SECONDS = 90.0


class ServerError(Exception):
    """A private server did not start or stop; the message says which and why."""


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise ServerError(f"{' '.join(cmd[:3])} ... failed ({done.returncode}): {done.stderr}")
    return done.stdout


def _postgres_bin() -> Path:
    found = sorted(
        (p for p in POSTGRES_BINARIES.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise ServerError(f"no Postgres server binaries under {POSTGRES_BINARIES}")
    return found[-1]


class PrivatePostgres:
    """A Postgres cluster of the suite's own: initdb into a temp dir, trust auth, fsync on,
    loopback only. ``restart()`` is a fast shutdown and a start, as an operator's would be.

    Parameters:
      settings: more server settings (``-c name=value``), e.g. ``shared_preload_libraries``.
      prefix: the name of its temp dir starts with this.
    """

    def __init__(
        self, settings: Mapping[str, str] | None = None, prefix: str = "bcast-faults-pg-"
    ) -> None:
        self.bin = _postgres_bin()
        self.settings = dict(settings or {})
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        # initdb refuses to run as root: the cluster belongs to the postgres user then.
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.running = False

    def __enter__(self) -> Self:
        try:
            _run(
                [
                    *self._as,
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",  # initdb's own files only; the server runs with fsync on
                ]
            )
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.dir}",
                "-c fsync=on",
                "-c max_connections=200",
                "-c shared_buffers=256MB",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        _run(
            [
                *self._as,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(int(START_SECONDS)),
                "-o",
                options,
                "start",
            ],
            timeout=START_SECONDS + 10,
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        _run(
            [*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            timeout=START_SECONDS + 10,
        )
        self.running = False

    def postmaster_pid(self) -> int:
        """The pid of the running server's postmaster (every backend is its child)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def close(self) -> None:
        """Stop the cluster (at once) and remove its files."""
        if self.data.exists():
            with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of the suite's own: a unique node name, its own ports, files, cookie
    and config (no plugins, so no management port), loopback only. ``restart()`` stops the
    node and starts it again with the same name and files (durable queues and persistent
    messages survive, as on a real restart).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bcast-faults-rabbit-"))
        self.node = f"bcast-faults-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.log = self.dir / "rabbitmq.log"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            # The suite's processes run on this machine: the default limits are plenty, and
            # a nearly full disk must not block publishers in the middle of a scenario.
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            # The node's Erlang cookie is made in HOME on first start; the CLI reads it there.
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            # Not the machine's env file: it names the machine's node.
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl`` against this node."""
        return _run(
            [str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env,
            timeout=timeout,
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_SCRIPTS / "rabbitmq-server")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ctl(
            "wait",
            str(self.dir / "rabbitmq.pid"),
            "--timeout",
            str(int(START_SECONDS)),
            timeout=START_SECONDS + 10,
        )
        self.ctl("await_startup", "--timeout", str(int(START_SECONDS)), timeout=START_SECONDS + 10)

    def stop(self) -> None:
        """Stop the node as an operator would (``rabbitmqctl stop``) and wait for its OS
        process to end; kill its process group if it does not.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=START_SECONDS)
        try:
            proc.wait(timeout=START_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name)

    def block_publishers(self, blocked: bool) -> None:
        """Raise (or clear) the node's memory alarm: while it is up, every connection that
        publishes is blocked by the broker, as under memory pressure.
        """
        self.ctl("set_vm_memory_high_watermark", "0" if blocked else "0.4")

    def blocked_connections(self, vhost: str) -> int:
        """Connections of ``vhost`` the broker blocks (they tried to publish under the alarm)."""
        out = self.ctl("list_connections", "--no-table-headers", "vhost", "state")
        return sum(1 for line in out.splitlines() if line.split() == [vhost, "blocked"])

    def queue_depths(self, vhost: str) -> dict[str, int]:
        """Messages (ready and unacknowledged) in each queue of ``vhost``."""
        out = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        depths: dict[str, int] = {}
        for line in out.splitlines():
            name, _, count = line.strip().rpartition("\t")
            if name and count.isdigit():
                depths[name] = int(count)
        return depths

    def close(self) -> None:
        """Stop the node and remove its files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
