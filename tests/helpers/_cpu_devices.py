"""Virtual CPU devices for the JAX tests that run in subprocesses.

JAX fixes its device count when its backend starts, so tests that need several devices run
their checks in a child process: :func:`cpu_device_env` gives the child's environment, and a
worker script calls :func:`force_cpu_devices` before anything imports jax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def cpu_device_env(count: int, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a child process with ``count`` CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", **extra)
    return env


def force_cpu_devices(count: int) -> None:
    """In a worker, before jax is imported: ``count`` CPU devices, on every JAX version."""
    os.environ.update(cpu_device_env(count))
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except (AttributeError, KeyError, RuntimeError):  # older JAX: XLA_FLAGS does it
        pass
