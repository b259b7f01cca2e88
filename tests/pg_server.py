"""A throw-away PostgreSQL server for a test: initdb and pg_ctl on a temporary folder, 127.0.0.1, a free port.

postgres refuses to run as root: as root, the server runs as the `postgres` user (runuser). Where no server
binaries are installed, or no user can run them, the test is skipped with the reason."""
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def server_binaries():
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
                        if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(candidates[-1]) if candidates else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user():
    """The command prefix that runs the server's binaries as a user postgres accepts."""
    if os.geteuid() != 0:
        return []
    import pwd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL test skipped: running as root and there is no 'postgres' user to run the server")
    if not shutil.which("runuser"):
        pytest.skip("PostgreSQL test skipped: running as root and runuser is missing")
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_server():
    """Yields postgresql://postgres@127.0.0.1:PORT/vega_test; stops the server and removes its folder after."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL test skipped: no PostgreSQL server binaries (initdb) found; .ci/run installs them "
                    "with apt-get where it can")
    prefix = as_server_user()
    folder = tempfile.mkdtemp(prefix="vega-pg-")
    if prefix:
        shutil.chown(folder, "postgres")
    data, port = os.path.join(folder, "data"), free_port()

    def call(*cmd):
        out = subprocess.run(prefix + [os.path.join(bin_dir, cmd[0]), *cmd[1:]], capture_output=True, text=True,
                             timeout=120)
        if out.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {out.stderr.strip() or out.stdout.strip()}")
    started = False
    try:
        call("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        call("pg_ctl", "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "-t", "60", "-o",
             f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        started = True
        import psycopg
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE vega_test")
        yield f"postgresql://postgres@127.0.0.1:{port}/vega_test"
    finally:
        if started:
            call("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
