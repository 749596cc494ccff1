"""Two real JAX processes joined by ``jax.distributed`` on 127.0.0.1: starting them and
waiting for them, robustly (used by the multi-process tests).

Output goes to files, not pipes: a worker blocked on a full pipe that nobody reads would
stall the other one at its next barrier. Both are waited for under one deadline and no
child outlives the call. If another program takes the port picked for the coordinator
before it binds, gRPC crashes process 0 with :data:`PORT_TAKEN`: callers retry.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

from _cpu_devices import cpu_device_env
from _net import free_port

#: What gRPC prints when process 0's coordinator cannot bind its port (then it crashes).
PORT_TAKEN = "Failed to add port to server"
#: The repository root, the workers' working directory.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict[str, str]:
    """The workers' environment: 2 CPU devices each, and no proxy variables. gRPC (which
    JAX's coordination service uses) honours ``http_proxy``/``https_proxy``/``grpc_proxy``;
    a CI machine that reaches its package registries through a proxy would send the
    workers' 127.0.0.1 connections there."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return cpu_device_env(2, base, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
                          PYTHONFAULTHANDLER="1", **extra)


def start(script: str, args: list[str], directory: pathlib.Path,
          **env: str) -> list[subprocess.Popen[bytes]]:
    """Start ``tests/helpers/<script> PROCESS_ID PORT *args`` twice, logging to
    ``directory/worker-<i>.log``."""
    port = str(free_port())
    procs = []
    for i in range(2):
        with open(directory / f"worker-{i}.log", "w") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "helpers", script), str(i), port,
                 *args], env=child_env(**env), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT))
    return procs


def run(script: str, args: list[str], directory: pathlib.Path, deadline_s: float,
        **env: str) -> tuple[list[int], list[str]]:
    """Start both workers, wait for both under one deadline (killing and reaping what is
    left), return their exit codes and logs."""
    procs = start(script, args, directory, **env)
    logs = [directory / f"worker-{i}.log" for i in range(2)]
    deadline = time.monotonic() + deadline_s
    notes = ["", ""]
    try:
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes[i] = f"\n[killed after {deadline_s} s]"
            if i == 0 and p.returncode and PORT_TAKEN in logs[0].read_text():
                break  # process 1 would only wait for a coordinator that never starts
    finally:
        for p in procs:  # on a timeout or an exception: no child outlives the call
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], [log.read_text() + n for log, n in zip(logs, notes, strict=True)]


def run_retrying(script: str, args: list[str], directory: pathlib.Path, deadline_s: float,
                 attempts: int = 3, **env: str) -> tuple[list[int], list[str]]:
    """:func:`run`, again with a new port when another program took the one picked."""
    for _ in range(attempts):
        codes, logs = run(script, args, directory, deadline_s, **env)
        if not (codes[0] and PORT_TAKEN in logs[0]):
            break
    return codes, logs
