"""Real services on loopback for the scale-out tests: an MLflow tracking server and a
PostgreSQL server, each with its state in a temp folder, started and stopped by a test.

Under CI (``CI=true``) a service that cannot start fails the test loudly; only outside CI
(no PostgreSQL installed on a developer's machine, say) does it skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
START_TIMEOUT_S = 180.0  # MLflow's server needs ~10-40 s to start on 2 busy cores


def unavailable(reason: str) -> NoReturn:
    """Skip outside CI; in CI these tests must run, so a missing service is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test may not be skipped)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Service:
    """A server process started in its own session, so its whole process group stops."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, stop_signal: int = signal.SIGTERM) -> None:
        """Stop the server and every process it started (workers), then reap it."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, stop_signal)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # Workers may outlive their parent for a moment: the group goes with it.
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _start(name: str, command: list[str], log: Path, env: dict[str, str] | None = None) -> Service:
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stop() ends its workers too
        )
    return Service(name=name, process=process, log=log)


def _wait_until(
    service: Service, ready: Callable[[], bool], what: str, last_error: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            service.stop()
            unavailable(
                f"{service.name} exited with {service.process.returncode} before {what}:\n"
                f"{service.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.25)
    service.stop()
    unavailable(
        f"{service.name} did not get {what} in {START_TIMEOUT_S:.0f} s (last probe: "
        f"{last_error() or '-'}):\n{service.log_tail()}"
    )


# Loopback probes never go through a proxy (http_proxy in a CI environment would take them).
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, errors: list[str] | None = None) -> bool:
    """Whether ``url`` answers 200; otherwise what went wrong is appended to ``errors``."""
    try:
        with DIRECT.open(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError) as err:
        if errors is not None:
            errors.append(f"{type(err).__name__}: {err}")
        return False


# ---------------------------------------------------------------------------------------
# MLflow tracking server


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    backend: str  # its --backend-store-uri
    artifacts: Path  # --artifacts-destination
    service: Service


@contextmanager
def mlflow_server(folder: Path, backend: str | None = None) -> Iterator[MlflowServer]:
    """``make mlflow-server`` on a free loopback port with its artifacts in ``folder`` and
    its runs in ``backend`` (default: a sqlite file in ``folder``)."""
    if shutil.which("make") is None:
        unavailable("`make` is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend or f"sqlite:///{folder / 'mlflow.db'}"
    artifacts = folder / "artifacts"
    command = [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        # The venv exists (the tests run in it): never reinstall it from inside a test.
        "-o",
        ".venv/.setup-stamp",
        "mlflow-server",
        f"MLFLOW_PORT={port}",
        f"MLFLOW_BACKEND_STORE={backend}",
        f"MLFLOW_ARTIFACTS={artifacts}",
    ]
    service = _start("mlflow server", command, folder / "server.log")
    uri = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in ("no_proxy", "NO_PROXY")}
    for name, value in saved.items():  # MLflow's client must not send loopback to a proxy
        os.environ[name] = ",".join(filter(None, [value, "127.0.0.1", "localhost"]))
    try:
        errors: list[str] = []
        _wait_until(
            service,
            lambda: http_ok(f"{uri}/health", errors),
            f"answering at {uri}/health",
            last_error=lambda: errors[-1] if errors else "",
        )
        yield MlflowServer(uri=uri, backend=backend, artifacts=artifacts, service=service)
    finally:
        service.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------
# PostgreSQL


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    service: Service

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (Optuna's and MLflow's storages take it as it is)."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres"
        )
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


def _postgres_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if not found:
        unavailable(
            "PostgreSQL server binaries are missing (/usr/lib/postgresql/*/bin): "
            "`make postgresql` installs Debian's postgresql"
        )
    return found[-1].parent


def _accepts(host: str, port: int, user: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(
            host=host, port=port, user=user, dbname="postgres", connect_timeout=2
        ).close()
    except psycopg2.OperationalError:
        return False
    return True


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throwaway PostgreSQL server on 127.0.0.1 (free port, trust auth, data in a temp
    folder). PostgreSQL refuses to run as root: as root it runs as the `postgres` user."""
    binaries = _postgres_bin()
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root but there is no `postgres` user to run the server as")
        run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    # Not under pytest's tmp_path: its 0700 folders are closed to the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="deepopt-postgres-"))
    try:
        data, sockets = folder / "data", folder / "sockets"
        sockets.mkdir()
        if run_as:
            for path in (folder, sockets):
                os.chown(path, run_as["user"], run_as["group"])
        user, port = "deepopt", free_port()
        log = folder / "server.log"
        initdb = subprocess.run(
            [
                str(binaries / "initdb"),
                *("-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"),
                *("--no-sync", "--no-instructions"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            **run_as,
        )
        if initdb.returncode != 0:
            unavailable(f"initdb failed ({initdb.returncode}): {initdb.stderr[-2000:]}")
        command = [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets)]
        for setting in (
            "listen_addresses=127.0.0.1",
            # A test database: durability is not what is tested, speed matters.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ):
            command += ["-c", setting]
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **run_as,
            )
        service = Service(name="postgres", process=process, log=log)
        try:
            _wait_until(service, lambda: _accepts("127.0.0.1", port, user), "accepting connections")
            yield Postgres(host="127.0.0.1", port=port, user=user, service=service)
        finally:
            service.stop(signal.SIGINT)  # PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(folder, ignore_errors=True)
