"""Shared fixtures. Heavy optional dependencies are imported inside the tests that use them."""

from __future__ import annotations

import os
import sys

import pytest

# Make the helpers importable (tests/helpers: _oracle.py, block_safetensors.py, workers...).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

import _warning_policy


def pytest_configure(config: pytest.Config) -> None:
    """Every warning is an error (pyproject.toml) except third-party deprecations raised from
    third-party code: the policy lives in tests/helpers/_warning_policy.py."""
    for line in _warning_policy.ini_lines():
        config.addinivalue_line("filterwarnings", line)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    # For every Hypothesis test (tests set only max_examples): timing is not a property under
    # test, so on a loaded 2-core CI machine a slow example must not fail the run, nor a
    # draw that happens to be large. Every other health check stays on.
    settings.register_profile(
        "safecodec", deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("safecodec")


@pytest.fixture
def restore_flags():
    """Undo changes tests make to module-level switches (mmap availability, host byte order)."""
    from safecodec import _dtypes, _source

    saved = (_source.MMAP_AVAILABLE, _dtypes.HOST_IS_LITTLE_ENDIAN)
    yield
    _source.MMAP_AVAILABLE, _dtypes.HOST_IS_LITTLE_ENDIAN = saved


@pytest.fixture(params=["reference-parser", "small-header-path", "scan-path"])
def header_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test three times: with the reference parser alone (safecodec._header; the fast
    paths switched off), with the parser's size-based dispatch as shipped
    (safecodec._header_fast), and with the NumPy scan of the raw bytes forced for every
    header (in production it checks large headers only: SCAN_MIN_BYTES). Differential
    tests use it so that every path agrees with the reference wheel on every case."""
    from safecodec import _header_fast

    if request.param == "reference-parser":
        monkeypatch.setattr(_header_fast, "FAST_PATHS", False)
    elif request.param == "scan-path":
        monkeypatch.setattr(_header_fast, "SCAN_MIN_BYTES", 0)
    return str(request.param)
