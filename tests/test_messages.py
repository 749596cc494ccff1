"""Messages for the mistakes people make first: a folder that does not exist, a PyTorch
checkpoint passed for a safetensors file, a truncated download, a dtype spelled ``bf16``.

Each case asserts the words, and that only the words changed: the error class is the one
the check always raised, and the reference wheel reaches the same verdict on the bytes.
"""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

import _oracle
import safecodec as sc
import safecodec.numpy
from safecodec import DtypeError, HeaderError, OffsetError
from safecodec._dtypes import DTYPE_ALIASES, DTYPES, dtype_from_text

# ----------------------------------------------------------------------------- wrong path


def test_saving_into_a_missing_folder_names_the_target(tmp_path):
    target = tmp_path / "no" / "such" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        sc.save_file({"w": np.ones(3)}, target)
    message = str(info.value)
    assert str(target) in message
    assert f"cannot create a file in {target.parent}, which does not exist" in message
    assert "safecodec-tmp" not in message and ".model.safetensors." not in message
    assert info.value.filename == str(target)
    assert not (tmp_path / "no").exists()


def test_saving_under_a_file_says_it_is_not_a_folder(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    target = tmp_path / "plain" / "model.safetensors"
    with pytest.raises(NotADirectoryError) as info:
        sc.numpy.save_file({"w": np.ones(3)}, str(target))
    assert f"cannot create a file in {tmp_path / 'plain'}, which is not a directory" in str(info.value)
    assert "safecodec-tmp" not in str(info.value)


# ----------------------------------------------------------------------------- wrong file


def _torch_zip(protocol: int = 2) -> bytes:
    """What ``torch.save`` writes since PyTorch 1.6: a zip archive holding a pickle and the
    tensor storages (the layout, not torch's own writer)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}, protocol=protocol))
        z.writestr("archive/data/0", np.ones(4, np.float32).tobytes())
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _legacy_torch(protocol: int) -> bytes:
    """Older ``torch.save``: pickles one after another, a magic number first."""
    return (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=protocol)
            + pickle.dumps({"weight": [1.0, 2.0]}, protocol=protocol) + b"\x00" * 64)


ZIP_WORDS = "not a safetensors file: this is a zip archive, which is how torch.save stores a PyTorch checkpoint"

# (name, bytes, the words that must lead the message, the format check's own words)
FOREIGN: list[tuple[str, bytes, str, str]] = [
    ("torch.save zip", _torch_zip(), ZIP_WORDS, "header too large"),
    ("zip, version 0: a length that fits, a short file",
     b"PK\x03\x04\x00\x00\x00\x00" + b"\x00" * 100, ZIP_WORDS, "invalid header length"),
    *[(f"legacy torch.save, pickle protocol {p}", _legacy_torch(p),
       f"not a safetensors file: this is a Python pickle (protocol {p}): a PyTorch checkpoint "
       "(.pt/.bin) as older torch.save wrote them", "header") for p in (2, 3, 4, 5)],
    ("pickle whose first bytes read as a 640-byte header",
     b"\x80\x02" + b"\x00" * 6 + b"\x8a" * 700,
     "not a safetensors file: this is a Python pickle (protocol 2)", "invalid UTF-8 in header"),
    ("numpy .npy", b"\x93NUMPY\x01\x00" + b"v" * 200,
     "not a safetensors file: this is a NumPy .npy file", "header"),
]


@pytest.mark.parametrize(("name", "data", "words", "check"), FOREIGN, ids=[c[0] for c in FOREIGN])
def test_a_foreign_file_says_what_it_is(tmp_path, name, data, words, check):
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    for load in (lambda: sc.load_file(path), lambda: sc.load(data), lambda: sc.read_header(path)):
        with pytest.raises(HeaderError) as info:
            load()
        message = str(info.value)
        assert message.startswith(words), message
        assert f". Format check: {check}" in message  # the failed check, after the words
    if "torch" in words:
        assert "torch.load(path, weights_only=True)" in message and "safecodec.save_file" in message
    _oracle.require()
    verdict = _oracle.deserialize(data)
    assert not verdict.ok, "the reference accepts it: only the words may change, not the verdict"


def test_a_safetensors_file_is_never_taken_for_a_foreign_one():
    # Valid files whose first bytes happen to match nothing keep the format's own words.
    good = sc.save({"w": np.ones(3, np.float32)})
    with pytest.raises(HeaderError) as info:
        sc.load(good[:8] + b"[" + good[9:])
    assert str(info.value).startswith("invalid JSON in header")


# ----------------------------------------------------------------------------- truncated


GOOD = sc.save({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int8)},
               {"k": "v"}, alignment=8)


@pytest.mark.parametrize("missing", [1, 5, 20, 48])
def test_a_truncated_file_says_truncated_with_both_sizes(tmp_path, missing):
    data = GOOD[:-missing]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data)
    with pytest.raises(OffsetError) as info:
        sc.load_file(path)
    assert str(info.value) == (
        f"truncated file: the header and tensors need {len(GOOD)} bytes, the file has "
        f"{len(data)} ({missing} missing; an interrupted download or copy?)")
    _oracle.require()
    assert not _oracle.deserialize(data).ok


def test_extra_bytes_are_not_called_truncation():
    with pytest.raises(OffsetError) as info:
        sc.load(GOOD + b"\x00\x00")
    assert "truncated" not in str(info.value)
    assert str(info.value).endswith(f"the file has {len(GOOD) + 2} (2 bytes after the last tensor)")


# ----------------------------------------------------------------------------- dtype names


@pytest.mark.parametrize(("text", "code"), [
    ("bf16", "BF16"), ("BF16", "BF16"), ("Bf16", "BF16"), ("bfloat16", "BF16"), ("BFloat16", "BF16"),
    ("fp16", "F16"), ("FP16", "F16"), ("f16", "F16"), ("F16", "F16"), ("half", "F16"),
    ("float16", "F16"), ("fp32", "F32"), ("f32", "F32"), ("FP32", "F32"), ("float32", "F32"),
    ("fp64", "F64"), ("double", "F64"), ("float64", "F64"), ("f8_e4m3", "F8_E4M3"),
    ("float8_e4m3fn", "F8_E4M3"), ("e5m2", "F8_E5M2"), ("int8", "I8"), ("u8", "U8"),
    ("bool", "BOOL"), (" fp16 ", "F16"),
])
def test_dtype_names_aliases_and_codes(text, code):
    assert dtype_from_text(text).code == code


def test_every_alias_and_code_resolves_to_its_row():
    for alias, code in DTYPE_ALIASES.items():
        assert dtype_from_text(alias) is DTYPES[code], alias
        assert dtype_from_text(alias.upper()) is DTYPES[code], alias
    for code in DTYPES:
        assert dtype_from_text(code.lower()) is DTYPES[code]


@pytest.mark.parametrize(("text", "match"), [
    ("float3", "unknown dtype 'float3'; use a code such as BF16, an alias such as bf16"),
    ("", "unknown dtype ''"),
    ("complex128", r"dtype 'complex128' has no safetensors code \(NumPy: complex128\)"),
    ("int4", "dtype 'int4' has no safetensors code"),
])
def test_unknown_dtype_names(text, match):
    with pytest.raises(DtypeError, match=match):
        dtype_from_text(text)


def test_dtype_name_must_be_text():
    with pytest.raises(DtypeError, match="must be a string, got int"):
        dtype_from_text(16)  # type: ignore[arg-type]

