"""Packaging promises: the wheel works on its own, imports stay light, no hidden dependency
on the reference wheel."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_does_not_pull_jax_or_fsspec():
    code = (
        "import sys, json, safecodec, safecodec.numpy; "
        "print(json.dumps(sorted(m for m in ('jax', 'jaxlib', 'fsspec', 'safetensors', "
        "'flax', 'objax', 'haiku', 'equinox') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []


def test_codec_tests_pass_with_safetensors_blocked():
    """Re-run the codec's own tests in a subprocess where ``import safetensors`` fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "block_safetensors", "-p", "no:cacheprovider",
         "tests/test_reader.py", "tests/test_writer.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_blocker_really_blocks():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"))
    code = (
        "import block_safetensors, sys\n"
        "block_safetensors.pytest_configure(None)\n"
        "try:\n    import safetensors\nexcept ImportError as e:\n    print('blocked', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("blocked"), out.stderr


_SMOKE = (
    "import numpy as np, safecodec, pathlib, subprocess, sys\n"
    "assert 'site-packages' in safecodec.__file__, safecodec.__file__\n"
    "p = pathlib.Path('w.safetensors')\n"
    "safecodec.save_file({'w': np.arange(6.0).reshape(2, 3)}, p, {'a': 'b'})\n"
    "t = safecodec.load_file(p)\n"
    "assert t['w'].tolist() == [[0, 1, 2], [3, 4, 5]]\n"
    "assert safecodec.read_header(p).metadata == {'a': 'b'}\n"
    "import importlib.resources as r\n"
    "assert r.files('safecodec').joinpath('py.typed').is_file()\n"
    "cli = subprocess.run([pathlib.Path(sys.executable).parent / 'safecodec', 'verify', str(p)],\n"
    "                     capture_output=True, text=True)\n"
    "assert cli.returncode == 0 and cli.stdout.startswith('OK   w.safetensors: 1 tensor'), cli\n"
    "print('ok', safecodec.__version__)\n"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """``python -m build``, as README's Install says: a source archive, then a wheel built
    from it."""
    pytest.importorskip("build", reason="the 'build' package (test extra) is needed")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_built_package_installs_into_a_clean_environment(dist, tmp_path, kind):
    """Install the wheel, or the source archive (pip builds it again), not editable, into a
    fresh venv; round-trip a file and run the command it installs."""
    pattern = "safecodec-*.whl" if kind == "wheel" else "safecodec-*.tar.gz"
    found = list(dist.glob(pattern))
    assert len(found) == 1, sorted(p.name for p in dist.iterdir())
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    # The clean environment sees only what it installed (not a PYTHONPATH pointing at the tree).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(found[0])], check=True,
                   timeout=900, env=env)
    out = subprocess.run([str(python), "-c", _SMOKE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 0.")


@pytest.mark.slow
def test_source_archive_holds_what_a_package_needs(dist):
    import tarfile

    (archive,) = dist.glob("safecodec-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "LICENSE", "safecodec/__init__.py",
                   "safecodec/py.typed"):
        assert needed in names, needed
