"""The ``safecodec`` command line, driven as a subprocess (``python -m safecodec``) on small
files in ``tmp_path``; a few in-process checks for the pieces that need no subprocess."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest

import safecodec as sc
from safecodec import _cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI the way a user does; stdin is not a TTY, so no progress bar appears."""
    return subprocess.run(
        [sys.executable, "-m", "safecodec", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((4, 16)).astype(np.float32),  # 256 bytes: aligned group
        "b": rng.standard_normal(5).astype(np.float16),  # 10 bytes
        "steps": np.arange(8, dtype=np.int64),  # 64 bytes
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "scale": np.array(2.5),
    }


@pytest.fixture()
def ref_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A file in the reference writer's 8-aligned layout, with metadata."""
    path = tmp_path / "ref.safetensors"
    sc.save_file(tensors(), path, {"format": "np", "note": "ünïcode"}, alignment=8)
    return path


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_help_lists_every_command(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("inspect", "verify", "align", "diff", "convert", "bench"):
        assert command in proc.stdout
    assert "exit status" in proc.stdout


def test_inspect_json_matches_the_header(ref_file):
    proc = run("inspect", "--json", ref_file.name, cwd=ref_file.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar or noise off a TTY
    data = json.loads(proc.stdout)
    header = sc.read_header(ref_file)
    assert data["metadata"] == {"format": "np", "note": "ünïcode"}
    assert [t["name"] for t in data["tensors"]] == list(header.tensors)
    for t in data["tensors"]:
        info = header.tensors[t["name"]]
        assert t["dtype"] == info.dtype.code
        assert t["shape"] == list(info.shape)
        assert t["bytes"] == info.nbytes
        assert t["offset"] == header.data_start + info.begin
        assert t["aligned"] == (t["offset"] % 64 == 0)
    totals = data["totals"]
    assert totals["parameters"] == sum(a.size for a in tensors().values()) == 64 + 5 + 8 + 3 + 0 + 1
    assert totals["bytes_by_dtype"] == {"I64": 64, "F64": 8, "F32": 256, "F16": 10, "BOOL": 3}
    assert totals["bytes"] == 341
    assert data["files"][0]["file_size"] == ref_file.stat().st_size


def test_inspect_table_shows_rows_totals_and_metadata(ref_file):
    proc = run("inspect", "--sort", "name", str(ref_file), cwd=ref_file.parent)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("name"))
    assert lines[heading].split() == ["name", "dtype", "shape", "bytes", "offset", "64-aligned"]
    names = [line.split()[0] for line in lines[heading + 2 : heading + 8]]
    assert names == sorted(tensors())
    w_row = next(line for line in lines if line.startswith("w "))
    assert w_row.split()[1:4] == ["F32", "[4,", "16]"]
    assert "parameters: 81" in out
    assert "note: ünïcode" in out


def test_verify_reports_each_file_and_the_failing_check(tmp_path, ref_file):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ref_file.read_bytes()[:-3])
    with pytest.raises(sc.OffsetError) as expected:
        sc.load_file(truncated)
    proc = run("verify", ref_file.name, truncated.name, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("OK   ref.safetensors: 6 tensors, 341 bytes")
    assert lines[1] == f"FAIL truncated.safetensors: OffsetError: {expected.value}"
    size = ref_file.stat().st_size
    assert (f"truncated file: the header and tensors need {size} bytes, the file has "
            f"{size - 3} (3 missing" in lines[1])

    ok = run("verify", "-q", ref_file.name, cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "")


def test_verify_checks_stored_checksums_and_convert_renews_them(tmp_path):
    path = tmp_path / "sums.safetensors"
    sc.save_file(tensors(), path, checksums=True)
    ok = run("verify", path.name, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("checksums verified")

    converted = tmp_path / "sums-f16.safetensors"
    assert run("convert", "-q", path.name, converted.name, "--dtype", "F16",
               cwd=tmp_path).returncode == 0
    again = run("verify", converted.name, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("checksums verified")

    header = sc.read_header(path)
    data = bytearray(path.read_bytes())
    data[header.data_start + header.tensors["w"].begin + 5] ^= 0x10  # one flipped bit in 'w'
    path.write_bytes(bytes(data))
    bad = run("verify", path.name, cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL sums.safetensors: ChecksumError: checksum mismatch for "
                                 "tensor 'w'")


def test_verify_finite_flags_nan(tmp_path):
    path = tmp_path / "nan.safetensors"
    sc.save_file({"x": np.array([1.0, np.nan, 2.0], np.float32)}, path)
    assert run("verify", path.name, cwd=tmp_path).returncode == 0
    proc = run("verify", "--finite", path.name, cwd=tmp_path)
    assert proc.returncode == 1
    assert "tensor 'x': 1 of 3 elements are NaN or infinite" in proc.stdout


def test_align_rewrites_into_the_zero_copy_layout(tmp_path, ref_file):
    before = sc.read_header(ref_file)
    assert before.data_start % 64 != 0
    out = tmp_path / "aligned.safetensors"
    proc = run("align", ref_file.name, out.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = sc.read_header(out)
    assert after.data_start % 64 == 0
    for info in after.tensors.values():
        if info.nbytes % 64 == 0:
            assert (after.data_start + info.begin) % 64 == 0, info.name
    assert after.metadata == before.metadata
    assert_same_tensors(sc.load_file(out), sc.load_file(ref_file))
    assert proc.stdout.strip() == f"wrote {out.name}: 6 tensors; 4 of 6 are 64-byte aligned"

    # In place: the writer replaces the file atomically while it is still mapped.
    again = run("align", "-q", ref_file.name, ref_file.name, cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, "")
    assert ref_file.read_bytes() == out.read_bytes()


def test_diff_reports_names_changes_and_max_abs_difference(tmp_path, ref_file):
    t = tensors()
    t["w"] = t["w"].copy()
    t["w"][1, 2] += 0.25
    t["b"] = t["b"].astype(np.float32)
    del t["steps"]
    t["extra"] = np.zeros(2, np.uint8)
    other = tmp_path / "other.safetensors"
    sc.save_file(t, other, {"format": "np", "note": "ünïcode"})

    proc = run("diff", "--json", ref_file.name, other.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["removed"] == ["steps"] and data["added"] == ["extra"]
    assert data["identical"] is False and data["metadata"] == {}
    by_name = {d["name"]: d for d in data["tensors"]}
    assert by_name["w"]["max_abs_diff"] == pytest.approx(0.25, rel=1e-6)
    assert by_name["w"]["differing"] == 1 and by_name["w"]["changed"]
    assert by_name["b"]["dtype"] == ["F16", "F32"] and by_name["b"]["max_abs_diff"] == 0.0
    assert not by_name["mask"]["changed"]

    text = run("diff", "--exit-code", ref_file.name, other.name, cwd=tmp_path)
    assert text.returncode == 1
    assert "- steps  (only in A)" in text.stdout and "+ extra  (only in B)" in text.stdout
    assert "F16 -> F32" in text.stdout
    assert "5 tensors in both (2 differ), 1 only in A, 1 only in B" in text.stdout

    same = run("diff", "--exit-code", ref_file.name, ref_file.name, cwd=tmp_path)
    assert same.returncode == 0
    assert "6 tensors in both (0 differ)" in same.stdout


def test_convert_casts_floating_tensors_only(tmp_path, ref_file):
    out = tmp_path / "bf16.safetensors"
    proc = run("convert", ref_file.name, out.name, "--dtype", "bfloat16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 cast to bfloat16" in proc.stdout  # w, b, empty, scale
    src, got = sc.load_file(ref_file), sc.load_file(out)
    for name, arr in src.items():
        if arr.dtype.kind == "f":
            assert got[name].dtype == ml_dtypes.bfloat16, name
            np.testing.assert_array_equal(got[name], arr.astype(ml_dtypes.bfloat16))
        else:
            np.testing.assert_array_equal(got[name], arr)
            assert got[name].dtype == arr.dtype
    assert sc.read_header(out).metadata == {"format": "np", "note": "ünïcode"}

    only = tmp_path / "only.safetensors"
    assert run("convert", ref_file.name, only.name, "--dtype", "F16", "--only", "w*",
               cwd=tmp_path).returncode == 0
    codes = {n: i.dtype.code for n, i in sc.read_header(only).tensors.items()}
    assert codes["w"] == "F16" and codes["scale"] == "F64"


@pytest.fixture()
def sharded(tmp_path: pathlib.Path) -> pathlib.Path:
    """A two-shard Hugging Face style checkpoint in the reference layout; shard 2 holds a
    tensor the index does not list (it must be ignored)."""
    sc.save_file({"a": np.arange(16, dtype=np.float32), "b": np.ones(3, np.float64)},
                 tmp_path / "m-00001-of-00002.safetensors", {"format": "pt"}, alignment=8)
    sc.save_file({"c": np.full(7, 3, np.float16), "stray": np.zeros(1, np.int8)},
                 tmp_path / "m-00002-of-00002.safetensors", alignment=8)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({
        "metadata": {"total_size": 64 + 24 + 14},
        "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00001-of-00002.safetensors",
                       "c": "m-00002-of-00002.safetensors"},
    }, indent=2))
    return index


def test_sharded_inspect_align_and_verify(tmp_path, sharded):
    data = json.loads(run("inspect", "--json", sharded.name, cwd=tmp_path).stdout)
    assert data["sharded"] is True
    assert {t["name"]: t["shard"] for t in data["tensors"]} == {
        "a": "m-00001-of-00002.safetensors", "b": "m-00001-of-00002.safetensors",
        "c": "m-00002-of-00002.safetensors"}
    assert data["totals"]["bytes"] == 102 and data["metadata"] == {"total_size": 102}

    (tmp_path / "out").mkdir()
    proc = run("align", sharded.name, "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    new_index = json.loads((tmp_path / "out" / sharded.name).read_text())
    assert new_index["weight_map"] == json.loads(sharded.read_text())["weight_map"]
    first = tmp_path / "out" / "m-00001-of-00002.safetensors"
    assert_same_tensors(sc.load_file(first), sc.load_file(tmp_path / "m-00001-of-00002.safetensors"))
    assert sc.read_header(first).metadata == {"format": "pt"}
    assert list(sc.read_header(tmp_path / "out" / "m-00002-of-00002.safetensors").tensors) == ["c"]

    # A directory with one index is that checkpoint; an index naming a tensor its shard lacks
    # fails with the name of the shard.
    bad = tmp_path / "bad.safetensors.index.json"
    bad.write_text(json.dumps({"weight_map": {"zz": "m-00002-of-00002.safetensors"}}))
    proc = run("verify", "out", bad.name, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == ("OK   out: 3 tensors, 102 bytes in 2 shards, "
                                            "no checksums stored")
    assert "FAIL bad.safetensors.index.json: SafecodecError: index" in proc.stdout
    assert ("maps 1 tensor to shard 'm-00002-of-00002.safetensors' that it does not hold: 'zz' "
            "(the shard holds 2 tensors)" in proc.stdout)


def test_errors_and_exit_codes(tmp_path, ref_file):
    missing = run("inspect", "nope.safetensors", cwd=tmp_path)
    assert missing.returncode == 1
    assert "safecodec inspect: error: FileNotFoundError" in missing.stderr
    assert missing.stdout == ""

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    bad = run("inspect", garbage.name, cwd=tmp_path)
    assert bad.returncode == 1
    assert "safecodec inspect: error: HeaderError: invalid JSON in header" in bad.stderr

    unknown = run("frobnicate", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'frobnicate'" in unknown.stderr

    int_target = run("convert", ref_file.name, "x.safetensors", "--dtype", "int8", cwd=tmp_path)
    assert int_target.returncode == 2
    assert "--dtype must be a floating type, got 'int8' (I8)" in int_target.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- in process


def test_bench_forwards_its_arguments(monkeypatch):
    calls: list[list[str]] = []
    fake = types.ModuleType("safecodec._bench")
    fake.main = lambda argv: calls.append(list(argv)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "safecodec._bench", fake)
    assert _cli.main(["bench", "--size", "small", "--help"]) == 3
    assert calls == [["--size", "small", "--help"]]


def test_inspect_reads_remote_urls(capsys):
    pytest.importorskip("fsspec")
    url = "memory://cli-test/remote.safetensors"
    sc.save_file({"x": np.ones((2, 8), np.float32)}, url, {"k": "v"})
    assert _cli.main(["inspect", "--json", url]) == 0
    data = json.loads(capsys.readouterr().out)
    start = sc.read_header(url).data_start
    assert start % 64 == 0
    assert [(t["name"], t["offset"], t["aligned"]) for t in data["tensors"]] == [("x", start, True)]
    assert data["metadata"] == {"k": "v"}


def test_progress_bar_only_on_a_tty(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert _cli._progress(100, "x", enabled=True)._bar is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _cli._progress(100, "x", enabled=False)._bar is None
    with _cli._progress(100, "x", enabled=True) as bar:
        bar.update(60)
        assert bar._bar is not None and bar._bar.n == 60


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
def test_count_nonfinite_for_every_float_family(dtype):
    x = np.array([1.0, np.nan, 2.0, np.inf, -np.inf if dtype != ml_dtypes.float8_e4m3fn else np.nan])
    assert _cli._count_nonfinite(x.astype(dtype)) == 3


def test_compare_arrays_treats_matching_nan_and_inf_as_equal():
    a = np.array([np.nan, np.inf, 1.0, -np.inf, 5.0], np.float32)
    b = np.array([np.nan, np.inf, 1.5, np.inf, 5.0], np.float32)
    worst, differing = _cli.compare_arrays(a, b, atol=0.0)
    assert worst == np.inf and differing == 2
    assert _cli.compare_arrays(a[:3], a[:3], atol=0.0) == (0.0, 0)
    assert _cli.compare_arrays(np.array([1.0]), np.array([1.1]), atol=0.2) == pytest.approx((0.1, 0))


@pytest.mark.parametrize(("text", "code"), [("bfloat16", "BF16"), ("BF16", "BF16"),
                                            ("float16", "F16"), ("float8_e4m3fn", "F8_E4M3")])
def test_parse_dtype_accepts_codes_and_names(text, code):
    assert _cli.parse_dtype(text).code == code


@pytest.mark.parametrize(("text", "message"), [("int8", "must be a floating type"),
                                               ("C64", "must be a floating type"),
                                               ("float3", "unknown dtype 'float3'"),
                                               ("int4", "'int4' has no safetensors code")])
def test_parse_dtype_rejects_non_floating(text, message):
    with pytest.raises(_cli.UsageError, match=message):
        _cli.parse_dtype(text)


def test_index_pointing_outside_its_directory_is_rejected(tmp_path):
    index = tmp_path / "evil.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/secret.safetensors"}}))
    with pytest.raises(sc.SafecodecError, match="not a file inside the checkpoint's directory"):
        _cli.Checkpoint(str(index))
    assert _cli.main(["verify", str(index)]) == 1


# ----------------------------------------------------------------------------- issue 16


SUBCOMMANDS = ("inspect", "verify", "align", "diff", "convert")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_is_wrapped_and_explains_every_argument(tmp_path, command):
    proc = subprocess.run([sys.executable, "-m", "safecodec", command, "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    description = lines[lines.index("") + 1 : lines.index("positional arguments:")]
    assert len([line for line in description if line]) >= 2  # a paragraph, not one long line
    parser = next(a for a in _cli.build_parser()._actions if a.dest == "command").choices[command]
    for action in parser._actions:
        if not action.option_strings:  # a positional argument
            assert action.help and len(action.help) > 10, (command, action.dest)
            assert action.help.split(",")[0] in proc.stdout.replace("\n" + " " * 15, " ")


def _one_tensor(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "one.safetensors"
    sc.save_file({"w": np.ones(16, np.float32)}, path)
    return path


def test_counts_of_one_are_singular(tmp_path):
    path = _one_tensor(tmp_path)
    ok = run("verify", path.name, cwd=tmp_path)
    assert ok.stdout.startswith("OK   one.safetensors: 1 tensor, 64 bytes, no checksums")
    aligned = run("align", path.name, "a.safetensors", cwd=tmp_path)
    assert aligned.stdout.strip() == "wrote a.safetensors: 1 tensor; 1 of 1 is 64-byte aligned"
    other = tmp_path / "two.safetensors"
    sc.save_file({"w": np.zeros(16, np.float32)}, other, {"k": "v"})
    diff = run("diff", path.name, other.name, cwd=tmp_path)
    assert "1 tensor in both (1 differs), 0 only in A, 0 only in B, 1 metadata change" in diff.stdout
    with sc.safe_open(path) as f, pytest.raises(sc.TensorNotFoundError, match=r"\(1 tensor\)"):
        f.get_tensor("nope")


def test_inspect_prints_index_metadata_as_json(tmp_path):
    d = tmp_path / "sh"
    sc.save_file({"a": np.ones(64, np.float32), "b": np.zeros(64, np.float32)}, d,
                 max_shard_size=300)
    proc = run("inspect", "sh", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((d / "model.safetensors.index.json").read_text())["metadata"]
    lines = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1]
             for line in proc.stdout.split("metadata:", 1)[1].splitlines() if ": " in line}
    assert json.loads(lines["safecodec.shards"]) == index["safecodec.shards"]
    assert json.loads(lines["total_size"]) == 512
    assert "{'" not in proc.stdout  # no Python reprs


@pytest.mark.parametrize(("spelling", "code"), [("bf16", "BF16"), ("BF16", "BF16"), ("fp16", "F16"),
                                                ("f16", "F16"), ("FP32", "F32"), ("f32", "F32"),
                                                ("Half", "F16")])
def test_convert_accepts_the_usual_dtype_aliases(tmp_path, ref_file, spelling, code):
    out = tmp_path / "out.safetensors"
    proc = run("convert", ref_file.name, out.name, "--dtype", spelling, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sc.read_header(out).tensors["w"].dtype.code == code


@pytest.mark.parametrize(("text", "code"), [("bf16", "BF16"), ("Fp16", "F16"), ("f32", "F32"),
                                            ("FLOAT64", "F64"), ("e4m3", "F8_E4M3")])
def test_parse_dtype_accepts_aliases(text, code):
    assert _cli.parse_dtype(text).code == code


def test_convert_only_pattern_that_matches_nothing_is_an_error(tmp_path, ref_file):
    out = tmp_path / "x.safetensors"
    proc = run("convert", ref_file.name, out.name, "--dtype", "bf16", "--only", "nomatch*",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert ("safecodec convert: error: --only 'nomatch*' matches no tensor of ref.safetensors "
            "(6 tensors, e.g. ") in proc.stderr
    assert not out.exists()
    # One good pattern does not excuse a bad one; only the bad one is named.
    mixed = run("convert", ref_file.name, out.name, "--dtype", "bf16", "--only", "w*",
                "--only", "W*", cwd=tmp_path)
    assert mixed.returncode == 2
    assert "--only 'W*' matches no tensor" in mixed.stderr and "'w*'" not in mixed.stderr
    assert not out.exists()


def test_align_sharded_creates_the_output_folder(tmp_path, sharded):
    proc = run("align", sharded.name, "new/aligned", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "new" / "aligned"
    assert sorted(p.name for p in out.iterdir()) == [
        "m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors", sharded.name]
    assert proc.stdout.startswith(f"wrote new/aligned/{sharded.name}: 3 tensors")
    assert_same_tensors(sc.load_file(out), sc.load_file(sharded))
    # A file that exists is not taken for a folder.
    (tmp_path / "taken").write_bytes(b"x")
    clash = run("align", sharded.name, "taken", cwd=tmp_path)
    assert clash.returncode == 2 and "OUT must be an index path" in clash.stderr


def test_resharding_removes_the_old_shards_only(tmp_path):
    d = tmp_path / "ck"
    t = {f"t{i}": np.full(64, i, np.float32) for i in range(4)}
    sc.save_file(t, d, max_shard_size=300)  # 4 shards
    (d / "README.md").write_text("keep")
    sc.save_file(t, d, max_shard_size=10_000)  # the same checkpoint in one shard
    assert sorted(p.name for p in d.iterdir()) == [
        "README.md", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert run("verify", "-q", "ck", cwd=tmp_path).returncode == 0


def test_saving_into_a_missing_folder_names_the_output(tmp_path, ref_file):
    proc = run("align", ref_file.name, "missing/out.safetensors", cwd=tmp_path)
    assert proc.returncode == 1
    assert "safecodec align: error: FileNotFoundError: " in proc.stderr
    assert "missing/out.safetensors" in proc.stderr and "which does not exist" in proc.stderr
    assert "safecodec-tmp" not in proc.stderr


def test_a_pytorch_file_is_named_as_such(tmp_path):
    import io
    import pickle
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": [1.0]}, protocol=2))
    (tmp_path / "pytorch_model.bin").write_bytes(buf.getvalue())
    proc = run("inspect", "pytorch_model.bin", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("safecodec inspect: error: HeaderError: not a safetensors file: "
                                  "this is a zip archive, which is how torch.save stores a "
                                  "PyTorch checkpoint")
    assert "torch.load" in proc.stderr
