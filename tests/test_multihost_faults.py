"""A collective ``safecodec.jax.save_file`` whose peer process is killed (issue 11, item 14):
two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 5 s heartbeat timeout,
``multihost_fault_worker.py``), one of which SIGKILLs itself in the middle of writing its
shards.

What JAX 0.10 does when a process dies (observed, and asserted below):

* By default (``jax_enable_recoverability`` off) the coordination service declares the dead
  process unhealthy after the heartbeat timeout, fails the barrier the survivors wait at
  ("Task 1 heartbeat timeout"), and at the same moment propagates the error to every
  process, whose JAX client then terminates it ("Terminating process because the JAX
  distributed service detected fatal errors"). Whether process 0 gets to raise its
  SafecodecError and remove its temporary first is a race no library can win; the
  previous file is intact either way, and a temporary left behind is unlocked, so the next
  save of the target removes it.
* When process 0, the coordinator, dies, the other process is terminated at once (its
  connection to the coordination service closes; no heartbeat timeout is waited for); it
  may get back from ``save_file`` first, with a SafecodecError (safecodec 861e74c let
  JAX's JaxRuntimeError "UNAVAILABLE: recvmsg:Connection reset by peer" through).
* With ``jax_enable_recoverability`` on, survivors keep running: the barrier is not failed
  but times out (the save's ``timeout_s``), and process 0 raises a SafecodecError that
  names the barrier and the process that is gone, and removes its temporary.
* Asking the coordination service which processes are alive blocks until the dead one's
  heartbeat times out: with a heartbeat timeout longer than the save's ``timeout_s``,
  process 0 still raises within ``timeout_s`` plus a few seconds (it does not wait for
  that answer).

The file's last test needs no second process: a dead writer's multi-host temporary is
removed by the next save of the same target.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("jax")

import safecodec as sc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import _two_processes  # noqa: E402

#: seconds all scenarios get in all (the workers dump their stacks and exit before)
DEADLINE_S = 150
#: what gRPC prints when the coordinator cannot bind its port (taken meanwhile)
#: what JAX's client logs when it terminates a process over another one's death
TERMINATED = "Terminating process because the JAX distributed service detected fatal errors"
#: the save's timeout_s, and JAX's heartbeat timeout, in the slow-heartbeat scenario
SLOW_TIMEOUT_S, SLOW_HEARTBEAT_S = 15, 60
#: the scenarios: name -> (process that dies, JAX mode, extra worker arguments: heartbeat
#: and save timeouts)
SCENARIOS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "peer-recoverable": (1, "recoverable", ()),
    "peer-default": (1, "default", ()),
    "coordinator-default": (0, "default", ()),
    "peer-recoverable-slow-heartbeat": (1, "recoverable",
                                        (str(SLOW_HEARTBEAT_S), str(SLOW_TIMEOUT_S))),
}
PREVIOUS = {"previous": np.arange(10, dtype=np.float32)}


def _start(directory: pathlib.Path, victim: int, mode: str,
           extra: tuple[str, ...]) -> list[subprocess.Popen[bytes]]:
    return _two_processes.start("multihost_fault_worker.py",
                                [str(directory), str(victim), mode, *extra], directory)


class Outcome:
    """One scenario's exit codes, logs, survivor's result and directory."""

    def __init__(self, directory: pathlib.Path, codes: list[int | None]) -> None:
        self.directory = directory
        self.codes = codes
        self.logs = [(directory / f"worker-{i}.log").read_text() for i in range(2)]
        self.results = {}
        for i in range(2):
            path = directory / f"result-{i}.json"
            if path.exists():
                self.results[i] = json.loads(path.read_text())

    def report(self) -> str:
        return "\n".join(f"---- process {i} (exit {c}) ----\n{log}"
                         for i, (c, log) in enumerate(zip(self.codes, self.logs, strict=True)))

    def temporaries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.endswith(".safecodec-tmp"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every scenario, run concurrently (each one waits mostly on heartbeats and barriers),
    never leaving a child behind; a scenario whose port was taken is started again."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in SCENARIOS}
    for d in dirs.values():
        sc.save_file(PREVIOUS, d / "m.safetensors")
    running = {name: _start(dirs[name], *SCENARIOS[name]) for name in SCENARIOS}
    done: dict[str, Outcome] = {}
    retries = 2
    deadline = time.monotonic() + DEADLINE_S
    try:
        while running:
            for name, procs in list(running.items()):
                if any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    continue
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                    p.wait()
                del running[name]
                codes = [p.returncode for p in procs]
                log0 = (dirs[name] / "worker-0.log").read_text()
                if codes[0] and _two_processes.PORT_TAKEN in log0 and retries:
                    retries -= 1
                    running[name] = _start(dirs[name], *SCENARIOS[name])
                    continue
                done[name] = Outcome(dirs[name], codes)
            time.sleep(0.2)
    finally:
        for procs in running.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    return done


def _previous_intact(directory: pathlib.Path) -> None:
    got = sc.load_file(directory / "m.safetensors")
    assert list(got) == ["previous"]
    np.testing.assert_array_equal(got["previous"], PREVIOUS["previous"])


@pytest.mark.slow
def test_peer_killed_mid_write_process_0_raises_and_publishes_nothing(outcomes) -> None:
    """jax_enable_recoverability on: process 0 survives, raises a SafecodecError (not
    JaxRuntimeError) naming the barrier and the dead process within the save's timeout,
    keeps the previous file and removes its temporary."""
    out = outcomes["peer-recoverable"]
    assert out.codes == [0, -9], out.report()
    assert "SIGKILL" in out.logs[1]
    r = out.results[0]
    assert r["raised"] == "SafecodecError" and r["safecodec_error"], r
    assert "JaxRuntimeError" not in r["mro"]
    assert re.search(r"barrier 'safecodec-save-\w+-\d+-written' failed, process 1 is gone",
                     r["message"]), r["message"]
    assert "nothing was published" in r["message"]
    assert r["elapsed"] < 8 + 10, r  # the save's timeout_s, plus slack for a loaded machine
    assert r["temporaries"] == [] and out.temporaries() == []
    _previous_intact(out.directory)


@pytest.mark.slow
def test_peer_killed_while_jax_still_counts_it_alive_process_0_raises_in_time(outcomes) -> None:
    """Issue 18, finding 9: JAX's heartbeat timeout (60 s) far longer than the save's
    timeout_s (15 s). The barrier times out; asking the coordination service which
    processes are alive would block until the heartbeat timeout, so process 0 must not
    wait for that answer: a SafecodecError within timeout_s plus a few seconds, the
    previous file intact, no temporary."""
    out = outcomes["peer-recoverable-slow-heartbeat"]
    assert out.codes == [0, -9], out.report()
    r = out.results[0]
    assert r["raised"] == "SafecodecError" and r["safecodec_error"], r
    assert re.search(r"barrier 'safecodec-save-\w+-\d+-written' failed", r["message"])
    assert "nothing was published" in r["message"]
    assert SLOW_TIMEOUT_S <= r["elapsed"] < SLOW_TIMEOUT_S + 6, r
    assert r["temporaries"] == [] and out.temporaries() == []
    _previous_intact(out.directory)


@pytest.mark.slow
def test_peer_killed_mid_write_default_jax_terminates_process_0(outcomes) -> None:
    """JAX's default: the barrier fails on the heartbeat timeout and JAX terminates process
    0 right away. If process 0 got to raise first, it raised a SafecodecError naming the
    heartbeat timeout; either way the previous file is intact and nothing is left after the
    next save."""
    out = outcomes["peer-default"]
    assert out.codes[1] == -9, out.report()
    if 0 in out.results:  # process 0 won the race (then it exits at once: os._exit)
        r = out.results[0]
        assert r["raised"] == "SafecodecError", r
        assert "JaxRuntimeError" not in r["mro"]
        assert re.search(r"barrier 'safecodec-save-\w+-\d+-written' failed", r["message"])
        assert "heartbeat timeout" in r["message"], r["message"]
        assert r["elapsed"] < 5 + 15, r  # the heartbeat timeout, plus slack
        assert r["temporaries"] == []
    else:
        assert TERMINATED in out.logs[0], out.report()
    _previous_intact(out.directory)
    sc.save_file({"next": np.ones(3, np.float32)}, out.directory / "m.safetensors")
    assert out.temporaries() == []


@pytest.mark.slow
def test_coordinator_killed_mid_write_jax_aborts_the_other_process(outcomes) -> None:
    """Process 0 dies holding its temporary: JAX terminates process 1 at once (if process
    1 gets back from save_file first, it raised a SafecodecError, never JaxRuntimeError). The
    temporary stays behind, full size and unlocked; the previous file is intact; the next
    save of the target removes the temporary."""
    out = outcomes["coordinator-default"]
    assert out.codes[0] == -9 and "SIGKILL" in out.logs[0], out.report()
    assert TERMINATED in out.logs[1], out.report()
    if 1 in out.results:  # it got back from save_file before JAX terminated it
        r = out.results[1]
        assert r["raised"] == "SafecodecError" and "JaxRuntimeError" not in r["mro"], r
        assert "nothing was published" in r["message"], r
    else:
        assert out.codes[1] not in (0, None), out.report()
    left = out.temporaries()
    assert len(left) == 1 and re.fullmatch(r"\.m\.safetensors\.mh-\w+-\d+\.safecodec-tmp",
                                           left[0]), left
    assert (out.directory / left[0]).stat().st_size > 0
    _previous_intact(out.directory)
    sc.save_file({"next": np.ones(3, np.float32)}, out.directory / "m.safetensors")
    assert out.temporaries() == []
    assert list(sc.load_file(out.directory / "m.safetensors")) == ["next"]


def test_next_save_removes_a_dead_multihost_temporary_but_not_a_live_one(tmp_path) -> None:
    """What a killed coordinator leaves: an unlocked, non-empty
    ``.m.safetensors.mh-<digest>-<n>.safecodec-tmp``. The next save removes it; a temporary
    whose writer is alive (holds its lock) stays."""
    fcntl = pytest.importorskip("fcntl")
    target = tmp_path / "m.safetensors"
    sc.save_file(PREVIOUS, target)
    dead = tmp_path / ".m.safetensors.mh-abc-0.safecodec-tmp"
    dead.write_bytes(b"\0" * 4096)
    live = tmp_path / ".m.safetensors.mh-def-1.safecodec-tmp"
    live.write_bytes(b"\0" * 4096)
    with open(live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        sc.save_file({"next": np.ones(3, np.float32)}, target)
        assert not dead.exists()
        assert live.exists()
        with contextlib.suppress(OSError):
            fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    assert list(sc.load_file(target)) == ["next"]
