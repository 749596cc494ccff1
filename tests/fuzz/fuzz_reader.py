"""Coverage-guided, differential fuzzing of the reader with atheris.

Run through ``nox -s fuzz`` (or directly: ``python tests/fuzz/fuzz_reader.py [-runs=N]``).
Each input goes through ``read_header``, ``load``, ``safe_open`` + slicing; the only
exceptions allowed out of safecodec are ``SafecodecError`` subclasses. The same bytes are
given to the reference wheel (``safetensors.deserialize``) when it is installed: the
accept/reject verdict and the tensors must agree, except for the documented deviations
(duplicate names, NUL characters). Inputs that reach new coverage are written to
``tests/fuzz/corpus/`` (the seed corpus) and replayed by ``tests/test_fuzz.py``. At exit
the number of cases run is printed.
"""

from __future__ import annotations

import atexit
import os
import sys

import atheris
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
with atheris.instrument_imports(include=["safecodec"]):
    import safecodec as sc
    import safecodec._header
    import safecodec._reader

try:
    import safetensors
except ImportError:  # differential part off
    safetensors = None

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
COUNTS = {"cases": 0, "accepted": 0, "rejected": 0, "differential": 0, "deviations": 0}


def _seed_corpus() -> None:
    """Write a few valid files as seeds so mutation starts from the format's shape."""
    os.makedirs(CORPUS, exist_ok=True)
    seeds = {
        "basic": sc.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int8(3)},
                         {"k": "v"}, alignment=8),
        "empty": sc.save({}, alignment=8),
        "zero": sc.save({"z": np.zeros((0, 4), np.float16)}, alignment=8),
    }
    for name, data in seeds.items():
        path = os.path.join(CORPUS, f"seed-{name}")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)


def _deviation(data: bytes) -> bool:
    return b"\\u0000" in data


def test_one_input(data: bytes) -> None:
    COUNTS["cases"] += 1
    if COUNTS["cases"] % 50_000 == 0 or COUNTS["cases"] == RUNS:
        _report()  # libFuzzer exits without running atexit handlers
    ours: dict[str, tuple[str, list[int], bytes]] | None
    try:
        header = sc.read_header(data)
        tensors = sc.load(data, unpack=False)
        with sc.safe_open(data) as f:
            for name in f.keys():  # noqa: SIM118 (exercises the handle API)
                s = f.get_slice(name)
                if s.get_shape() and s.get_dtype() not in ("F4", "F6_E2M3", "F6_E3M2"):
                    s[0:1]
        ours = {
            n: (i.dtype.code, list(i.shape), bytes(np.ascontiguousarray(tensors[n]).view(np.uint8)))
            for n, i in header.tensors.items()
        }
        COUNTS["accepted"] += 1
    except sc.SafecodecError:
        ours = None
        COUNTS["rejected"] += 1
    if safetensors is None:
        return
    try:
        ref = {n: (d["dtype"], list(d["shape"]), bytes(d["data"]))
               for n, d in safetensors.deserialize(data)}
    except Exception:  # the oracle's own error type
        ref = None
    COUNTS["differential"] += 1
    if (ours is None) != (ref is None) or (ours is not None and ours != ref):
        if _deviation(data) or (ours is None and _has_duplicate_names(data)):
            COUNTS["deviations"] += 1
            return
        raise AssertionError(f"verdicts differ: safecodec {ours is not None}, reference "
                             f"{ref is not None} for {data[:200]!r}")


def _has_duplicate_names(data: bytes) -> bool:
    import json

    try:
        n = int.from_bytes(data[:8], "little")
        pairs = json.loads(data[8 : 8 + n], object_pairs_hook=lambda p: p)
        names = [k for k, _ in pairs]
        return len(names) != len(set(names))
    except Exception:
        return False


def _report() -> None:
    print(f"fuzz cases run: {COUNTS['cases']} (accepted {COUNTS['accepted']}, rejected "
          f"{COUNTS['rejected']}, differential checks {COUNTS['differential']}, documented "
          f"deviations {COUNTS['deviations']})", flush=True)


RUNS = -1


def main() -> None:
    global RUNS
    _seed_corpus()
    atexit.register(_report)
    argv = list(sys.argv)
    if not any(a.startswith("-runs=") or a.startswith("-max_total_time=") for a in argv[1:]):
        argv.append("-runs=200000")
    for a in argv[1:]:
        if a.startswith("-runs="):
            RUNS = int(a.partition("=")[2])
    argv.append("-max_len=4096")
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(CORPUS)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
