"""A throwaway PostgreSQL cluster for the tests of the stored responses and profiles (``postgres_url`` in
tests/conftest.py): Debian's package, installed when missing, run by the postgres user on a temporary folder."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import ENSURE_PACKAGE
from tests.support.live_server import free_port


def postgres_bin() -> Path:
    """The folder of Debian's ``initdb`` and ``pg_ctl``, installing the ``postgresql`` package when missing (skips
    where it cannot be installed: no apt-get, or not root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        result = subprocess.run(
            ["bash", str(ENSURE_PACKAGE), "pg_ctlcluster", "postgresql"], capture_output=True, text=True, timeout=900
        )
        if result.returncode == 3:
            pytest.skip(f"PostgreSQL cannot be installed here: {result.stderr.strip()}")
        assert result.returncode == 0, f"installing PostgreSQL failed:\n{result.stdout}\n{result.stderr}"
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "the postgresql package installed no initdb"
    return Path(found[-1]).parent


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb and pg_ctl on a temporary folder and a free port, as a non-root user)."""
    bin_dir = postgres_bin()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running PostgreSQL as root needs runuser to switch to the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="amulet-pg-"))
    data, port = folder / "data", free_port()
    if as_user:
        shutil.chown(folder, "postgres")
    run = lambda *args: subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    assert init.returncode == 0, init.stderr
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    assert start.returncode == 0, start.stderr + (folder / "log").read_text(errors="replace")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
