"""A throwaway local Ray cluster for the tests that join one by address, stopped without touching
anyone else's Ray.

``ray stop`` stops every Ray instance on the machine (a user's, another run's); this starts a head
with ``--block`` in a process group of its own, on free ports and with a temp dir of its own, and
on exit ends that group and any process still naming the temp dir (Ray's daemons carry it in
their command line), and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

import psutil

PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",  # (the client server needs ray[client])
                "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def local_cluster(env: Mapping[str, str], num_cpus: int = 2, timeout: float = 120.0) -> Iterator[str]:
    """Yield the address (``127.0.0.1:PORT``) of a Ray head started with ``env``; stop it after."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="evray-", dir="/tmp")  # short: Ray's unix sockets live under it
    ports = [arg for option in PORT_OPTIONS for arg in (option, str(free_port()))]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", *ports],
        env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        started, said = time.time(), []
        for line in head.stdout:  # ray start prints its banner once the node is up, then blocks
            said.append(line)
            if "--block" in line or "Ray runtime started" in line:
                break
            if time.time() - started > timeout:
                raise TimeoutError(f"ray start did not come up in {timeout:.0f} s:\n{''.join(said)[-2000:]}")
        if head.poll() is not None or not _listening(port):
            raise RuntimeError(f"ray start failed:\n{''.join(said)[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head, temp)


def _stop(head: subprocess.Popen, temp: str) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:  # the daemons stop on SIGTERM; `ray start --block` itself keeps waiting, so it gets SIGKILL
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
    # Daemons Ray started in sessions of their own still name our temp dir in their arguments.
    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp in arg for arg in (p.info["cmdline"] or []))]
    for process in mine:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=20)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp, ignore_errors=True)
