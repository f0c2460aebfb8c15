"""Real servers on loopback for the integration tests: PostgreSQL (Debian's package, which
`make test` installs) and `mlflow server` on it. Each is started here and stopped by its own
PID; nothing else on the machine is touched."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers at all (an HTTP error is an answer), the process dies, or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group this test started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def stop_leader(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the process alone, as `kill PID` sends it, so that it stops what it started
    itself; then SIGKILL to whatever of its group is left. For `d2d serve`: SIGTERM to the whole
    group also reached the local Ray's GCS and raylet (Ray blocks only SIGINT in them), and
    Serve's shutdown then waited 30 s for a controller that could no longer answer."""
    import psutil

    if proc.poll() is None:
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        wait_gone(started, 10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_gone(procs: list, timeout: float) -> None:
    """Until every process has exited, SIGKILL for those left after `timeout`. A process that
    exited but was not reaped counts as gone: in a container whose PID 1 reaps nothing, the
    orphans of a stopped server stay zombies, and this process cannot reap them."""
    import psutil

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed; `make test` installs Debian's postgresql package")
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; as root, run it as the postgres user the package created."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def pg_url(user: str, password: str | None, host: str, database: str, driver: str = "postgresql") -> str:
    """A PostgreSQL URL with the user and password percent-encoded: a password with @ : / # ? %
    would otherwise change where the URL points."""
    credentials = urllib.parse.quote(user, safe="") + (f":{urllib.parse.quote(password, safe='')}" if password else "")
    return f"{driver}://{credentials}@{host}/{database}"


@contextmanager
def postgres(workdir: Path, databases: tuple[str, ...] = ("mlflow",), password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with these databases; yields the first one's URI.
    With `password`, TCP clients must give it (SCRAM), as on a team's server."""
    bin_dir = _pg_bin()
    data, sockets = workdir / "pgdata", workdir / "pgsock"
    for d in (workdir, sockets):
        d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
        os.chmod(workdir, 0o755)
        for parent in workdir.parents:  # the postgres user must be able to reach its folder
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    auth = ["--auth=trust"]
    if password:
        pwfile = workdir / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen(
        _as_postgres([str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(sockets)]),
        stdout=subprocess.DEVNULL, stderr=open(workdir / "postgres.log", "w"), start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {(workdir / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.3)
        for name in databases:
            subprocess.run(_as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name]),
                           check=True, capture_output=True, timeout=60, env={**os.environ, "PGPASSWORD": password or ""})
        yield pg_url("postgres", password, f"127.0.0.1:{port}", databases[0])
    finally:
        # SIGTERM is PostgreSQL's "smart" shutdown; runuser passes it on to the server
        stop(proc)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path, auth: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` with the given backend store, serving artifacts from a local folder; yields its URL.

    `auth` ({"database_uri", "username", "password"}): behind MLflow's basic-auth app, with
    that admin and its user store in that database."""
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    env, app = dict(os.environ), []
    if auth:
        ini = log.with_name("basic_auth.ini")
        # configparser reads "%" as interpolation: an encoded password's "%" is doubled
        database_uri = auth["database_uri"].replace("%", "%%")
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {database_uri}\n"
                       f"admin_username = {auth['username']}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": auth["password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        app = ["--app-name", "basic-auth"]
    proc = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *app],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        stop(proc)


@contextmanager
def prefect_server(workdir: Path, env: dict[str, str], database_url: str | None = None,
                   auth_string: str | None = None) -> Iterator[str]:
    """`prefect server start` on loopback (on PostgreSQL when `database_url` is given); yields its
    API URL. With `auth_string` ("user:password"), Prefect's basic auth: every call but
    /api/health needs it (clients set PREFECT_API_AUTH_STRING)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_HOME": str(workdir / "prefect_home")}
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    with open(workdir / "prefect_server.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{api}/health", 180, proc)
            yield api
        finally:
            stop(proc)


@contextmanager
def ray_head(workdir: Path, env: dict[str, str], num_cpus: int = 4) -> Iterator[dict[str, str]]:
    """`ray start --head --block` with token auth and the dashboard (job API) on loopback;
    stopped by its PID (and the processes it started), never with `ray stop`, which would
    stop other Ray instances too. Ray swaps a loopback node IP for the host's own address
    (`resolve_ip_for_localhost`), so its internal ports are token-protected, not loopback-only.
    Yields the env with RAY_AUTH_MODE/RAY_AUTH_TOKEN, the dashboard URL and the GCS address."""
    import tempfile

    import psutil

    venv_bin = str(Path(sys.executable).parent)
    # On SIGTERM a node first drains, so that Serve's proxies stop routing to it, for up to
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s): these clusters serve nothing, and each
    # teardown spent the 30 s
    env = {**env, "PATH": f"{venv_bin}{os.pathsep}{env['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    log = open(workdir / "ray_start.log", "w")
    head = subprocess.Popen(
        [f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 120)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)  # --block stops the node's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        wait_gone(started, 30)
        log.close()
        # `ray start` records its address for later `ray.init()` calls; `ray stop` would remove it
        current = Path(tempfile.gettempdir()) / "ray/ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
