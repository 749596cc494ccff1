"""When the fast placement path (``safecodec._jax_put.InternalPut``, built on the private
``xla_client.batched_device_put``) must be the one selected.

``_select_put`` falls back to the public API silently when the private one is missing or
fails its self-check. That is right for users, but in the suite a silent fallback would turn
every ``[internal]`` test into a skip and leave the run green while the benchmark claims (which
rest on the fast path) no longer hold. On the JAX versions the project supports, jax 0.10.x
(Python 3.11) and the newest jax (Python 3.13: 0.12 when this was written), the fallback
is a failure. A JAX release that removes the private function therefore fails the suite
on purpose: adapt ``InternalPut`` or decide, visibly, to drop the fast path for it.
"""

from __future__ import annotations

import os
import re

#: The oldest JAX on which the fast path is promised (Python 3.11 resolves jax 0.10.x, the
#: oldest release the test sessions install).
OLDEST_SUPPORTED_JAX = (0, 10)

#: Set in the environment, this forces the public API (an explicit choice, not a fallback).
FORCE_PUBLIC = "SAFECODEC_JAX_PUBLIC_API"


def jax_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def fast_path_required() -> bool:
    """True on a supported JAX, unless the public API was forced on purpose."""
    import jax

    return jax_version(jax.__version__) >= OLDEST_SUPPORTED_JAX and not os.environ.get(FORCE_PUBLIC)


def missing_fast_path(reason: str) -> None:
    """Fail where the fast path is required, skip (with ``reason``) where it is not."""
    import pytest

    if fast_path_required():
        import jax

        pytest.fail(f"{reason} on jax {jax.__version__}, where it is required (tests/_placement.py)")
    pytest.skip(reason)
