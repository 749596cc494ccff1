"""safecodec.remap: Hugging Face checkpoints into real Flax NNX and linen models, planned
from headers, and back.

The checkpoint is written by the reference wheel in Hugging Face layout (sharded, with an
index); every value is compared with an independent NumPy transform of the same tensors
(``tests/helpers/_llama_ckpt.py``). Device-block reads under real shardings run in a child
process with 8 CPU devices (``tests/helpers/remap_sharding_worker.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
st_numpy = pytest.importorskip("safetensors.numpy")

import jax.numpy as jnp  # noqa: E402

import safecodec as sc  # noqa: E402
from safecodec import remap as R  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import _llama_ckpt as ck  # noqa: E402
from _cpu_devices import cpu_device_env  # noqa: E402

H, NH, KV, HD, FF, L, V = ck.H, ck.NH, ck.KV, ck.HD, ck.FF, ck.L, ck.V


# ----------------------------------------------------------------------------- models


class Attention(nnx.Module):
    def __init__(self, stacked: int | None) -> None:
        lead = () if stacked is None else (stacked,)

        def p(*shape: int, dt: object = jnp.bfloat16) -> nnx.Param:
            return nnx.Param(jnp.zeros(lead + shape, dt))

        self.q, self.k, self.v, self.o = p(H, NH, HD), p(H, KV, HD), p(H, KV, HD), p(NH, HD, H)


class Mlp(nnx.Module):
    def __init__(self, stacked: int | None) -> None:
        lead = () if stacked is None else (stacked,)
        self.gate = nnx.Param(jnp.zeros((*lead, H, FF), jnp.bfloat16))
        self.up = nnx.Param(jnp.zeros((*lead, H, FF), jnp.bfloat16))
        self.down = nnx.Param(jnp.zeros((*lead, FF, H), jnp.bfloat16))


class Block(nnx.Module):
    def __init__(self, stacked: int | None = None) -> None:
        lead = () if stacked is None else (stacked,)
        self.attn = Attention(stacked)
        self.mlp = Mlp(stacked)
        self.attn_norm = nnx.Param(jnp.ones((*lead, H), jnp.float32))
        self.mlp_norm = nnx.Param(jnp.ones((*lead, H), jnp.float32))


class Llama(nnx.Module):
    """A Llama-shaped NNX model: one scanned block stack, or a list of blocks."""

    def __init__(self, scanned: bool, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(V, H, rngs=rngs)
        self.layers = Block(L) if scanned else nnx.List([Block() for _ in range(L)])
        self.final_norm = nnx.RMSNorm(H, rngs=rngs)
        self.lm_head = nnx.Linear(H, V, use_bias=False, param_dtype=jnp.bfloat16, rngs=rngs)


def abstract_state(scanned: bool) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Llama(scanned, nnx.Rngs(0))))


def flat_state(state: nnx.State) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if keys[-1] == "value":
            keys = keys[:-1]
        out[".".join(keys)] = leaf
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    directory = str(tmp_path_factory.mktemp("hf"))
    return directory, ck.write(directory)


# ----------------------------------------------------------------------------- NNX


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "per-layer"])
def test_llama_into_nnx_matches_numpy(hf, scanned: bool) -> None:
    directory, t = hf
    state = sc.load_tree(directory, like=abstract_state(scanned), remap=ck.rules(scanned=scanned))
    assert isinstance(state, nnx.State)
    model = nnx.eval_shape(lambda: Llama(scanned, nnx.Rngs(0)))
    nnx.update(model, state)  # the real model takes the loaded state
    got = flat_state(nnx.state(model))
    want = ck.reference(t, scanned=scanned)
    assert set(got) == set(want)
    for name, arr in want.items():
        assert isinstance(got[name], jax.Array), name
        assert got[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), arr, err_msg=name)
    # the model runs on what was loaded
    assert model.embed(jnp.array([1, 2])).shape == (2, H)


def test_with_metadata_comes_from_the_planned_header(hf) -> None:
    directory, _ = hf
    state, metadata = sc.load_tree(directory, like=abstract_state(True), remap=ck.rules(),
                                   with_metadata=True)
    assert isinstance(state, nnx.State)
    with sc.safe_open(directory) as f:
        assert metadata == f.metadata()
        planned = R.plan(f, ck.rules(), like=abstract_state(True))
        assert planned.header is f.header


def test_inverse_round_trip_is_byte_identical_by_the_wheel(hf, tmp_path) -> None:
    directory, t = hf
    rules = ck.rules()
    state = R.plan(directory, rules, like=abstract_state(True)).load()
    out = tmp_path / "export"
    sc.save_tree(state, out, remap=rules.inverse(like=directory), max_shard_size=20_000,
                 alignment=8)
    index = json.loads((out / ck.INDEX).read_text())
    got: dict[str, np.ndarray] = {}
    for fname in sorted(set(index["weight_map"].values())):
        got.update(st_numpy.load_file(out / fname))
        from safetensors import safe_open

        with safe_open(str(out / fname), "np") as f:
            md = f.metadata()  # what transformers checks, plus the shard identity safecodec adds
            assert {k: v for k, v in md.items() if not k.startswith("safecodec.")} == {"format": "pt"}
    want = {k: v for k, v in t.items() if "inv_freq" not in k}  # ignored: not in the model
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), name


def test_inverse_without_the_original_keeps_tree_dtypes(hf) -> None:
    directory, t = hf
    state = sc.load_tree(directory, like=abstract_state(False), remap=ck.rules(scanned=False))
    data = sc.save_tree(state, remap=ck.rules(scanned=False).inverse())
    back = sc.load(data)
    assert back["model.norm.weight"].dtype == np.float32  # astype cannot know bf16 without like=
    np.testing.assert_array_equal(back["model.norm.weight"], t["model.norm.weight"].astype(np.float32))
    assert back["model.layers.2.mlp.down_proj.weight"].tobytes() == \
        t["model.layers.2.mlp.down_proj.weight"].tobytes()
    with sc.safe_open(data) as f:
        assert f.metadata() == {"format": "pt"}


def test_plan_summary_counts_bytes_and_casts(hf) -> None:
    directory, t = hf
    with R.plan(directory, ck.rules(), like=abstract_state(True)) as p:
        s = p.summary()
    rows = {r.target: r for r in s["targets"]}
    assert rows["layers.attn.q"].bytes == L * NH * HD * H * 2  # its chunk only, every layer
    assert rows["layers.attn.q"].sources == tuple(
        f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(L))
    assert rows["final_norm.scale"].cast == "exact" and rows["layers.attn.q"].cast == "none"
    assert any(c.startswith("embed.embedding: bfloat16 -> float32") for c in s["casts"])
    used = sum(v.nbytes for k, v in t.items() if "inv_freq" not in k)
    assert s["total"]["bytes"] == used == s["total"]["source_bytes"]  # one device: all, once
    assert s["requests_estimated"] is True and s["total"]["requests"] >= len(rows)


def test_progress_callback_reports_every_target(hf) -> None:
    directory, _ = hf
    seen: list[tuple[str, int]] = []
    R.plan(directory, ck.rules(), like=abstract_state(True)).load(
        progress=lambda name, n: seen.append((name, n)))
    assert [n for n, _ in seen] == sorted(flat_state(abstract_state(True)), key=[
        n for n, _ in seen].index)
    assert dict(seen)["layers.mlp.down"] == L * FF * H * 2


def test_framework_numpy_and_jax_override_the_template(hf) -> None:
    """load_tree(remap=, framework=): "numpy" gives NumPy arrays for a template of
    ShapeDtypeStructs (nothing placed), "jax" gives jax.Arrays for NumPy leaves; the
    values are the same either way."""
    directory, t = hf
    want = ck.reference(t)
    state = abstract_state(True)
    as_numpy = flat_state(sc.load_tree(directory, like=state, remap=ck.rules(), framework="numpy"))
    assert set(as_numpy) == set(want)
    for name, arr in want.items():
        assert type(as_numpy[name]) is np.ndarray and as_numpy[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(as_numpy[name], arr, err_msg=name)
    numpy_like = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), state)
    as_jax = flat_state(sc.load_tree(directory, like=numpy_like, remap=ck.rules(), framework="jax"))
    for name, arr in want.items():
        assert isinstance(as_jax[name], jax.Array), name
        np.testing.assert_array_equal(np.asarray(as_jax[name]), arr, err_msg=name)
    followed = flat_state(sc.load_tree(directory, like=numpy_like, remap=ck.rules()))
    assert all(type(v) is np.ndarray for v in followed.values())  # None: as the template
    with pytest.raises(sc.SafecodecError, match="unsupported framework 'torch'"):
        sc.load_tree(directory, like=state, remap=ck.rules(), framework="torch")


def test_copy_reads_without_mapping_and_refuses_a_mapped_handle(hf, tmp_path) -> None:
    """copy=True: the checkpoint is read by positioned reads (no reader maps its file),
    values unchanged; an open handle that maps its file is refused with copy=True."""
    directory, t = hf
    want = ck.reference(t)
    with R.plan(directory, ck.rules(), like=abstract_state(True), copy=True) as p:
        assert all(r.buffer is None for r in R._readers(p._handle))
        got = flat_state(p.load())
    for name, arr in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), arr, err_msg=name)
    loaded = flat_state(sc.load_tree(directory, like=abstract_state(True), remap=ck.rules(),
                                     copy=True))
    for name, arr in want.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), arr, err_msg=name)
    with sc.safe_open(os.path.join(directory, "model.safetensors.index.json")) as handle:
        with pytest.raises(sc.SafecodecError, match="copy=True, but the open handle"):
            R.plan(handle, ck.rules(), like=abstract_state(True), copy=True)
        mapped = flat_state(R.plan(handle, ck.rules(), like=abstract_state(True)).load())
        np.testing.assert_array_equal(np.asarray(mapped["layers.mlp.up"]), want["layers.mlp.up"])


def test_verifying_handle_checks_mapped_boxes(tmp_path) -> None:
    """An open handle with verify=True: the boxes read from the mapping are checked
    against the stored checksums (a flipped byte raises ChecksumError), and an intact
    file loads."""
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    path = str(tmp_path / "v.safetensors")
    sc.save_file({"w": w}, path, checksums=True)
    rules = R.Rules(R.map("w", "k", R.transpose(1, 0)))
    like = {"k": jax.ShapeDtypeStruct((32, 64), np.float32)}
    with sc.safe_open(path, verify=True) as handle:
        got = R.plan(handle, rules, like=like).load()["k"]
    np.testing.assert_array_equal(np.asarray(got), w.T)
    raw = bytearray((tmp_path / "v.safetensors").read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor's bytes
    (tmp_path / "v.safetensors").write_bytes(bytes(raw))
    with sc.safe_open(path, verify=True) as handle, pytest.raises(sc.ChecksumError):
        R.plan(handle, rules, like=like).load()


# ----------------------------------------------------------------------------- linen


class TorchNet(linen.Module):
    """A linen model whose PyTorch twin is Embedding, Conv2d, LayerNorm, Linear x2."""

    @linen.compact
    def __call__(self, tokens: jax.Array, image: jax.Array) -> jax.Array:
        x = linen.Embed(10, 6, name="embed")(tokens)
        y = linen.Conv(6, (3, 3), name="conv")(image).mean(axis=(1, 2))
        h = linen.LayerNorm(name="norm")(x.mean(axis=1) + y)
        for i in range(2):
            h = linen.Dense(6, name=f"layers_{i}")(h)
        return linen.BatchNorm(use_running_average=True, name="bn")(h)


def torch_checkpoint(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = {
        "embed.weight": rng.standard_normal((10, 6)).astype(np.float32),
        "conv.weight": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),  # (out, in, kh, kw)
        "conv.bias": rng.standard_normal(6).astype(np.float32),
        "norm.weight": rng.standard_normal(6).astype(np.float32),
        "norm.bias": rng.standard_normal(6).astype(np.float32),
        "bn.weight": rng.standard_normal(6).astype(np.float32),
        "bn.bias": rng.standard_normal(6).astype(np.float32),
        "bn.running_mean": rng.standard_normal(6).astype(np.float32),
        "bn.running_var": rng.random(6).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }
    for i in range(2):
        t[f"layers.{i}.weight"] = rng.standard_normal((6, 6)).astype(np.float32)
        t[f"layers.{i}.bias"] = rng.standard_normal(6).astype(np.float32)
    return t


def test_torch_to_flax_on_linen(tmp_path) -> None:
    t = torch_checkpoint(np.random.default_rng(1))
    path = tmp_path / "pytorch_model.safetensors"
    st_numpy.save_file(t, path, metadata={"format": "pt"})
    model = TorchNet()
    args = (jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 5, 5, 2)))
    variables = jax.eval_shape(model.init, jax.random.key(0), *args)
    rules = R.Rules(R.torch_to_flax(),
                    # explicit rules win over the conventions: this bias comes negated
                    R.map("norm.bias", "params.norm.bias", R.fn(np.negative, inverse=np.negative)))
    loaded = sc.load_tree(path, like=variables, remap=rules)
    p, bs = loaded["params"], loaded["batch_stats"]
    np.testing.assert_array_equal(p["embed"]["embedding"], t["embed.weight"])
    np.testing.assert_array_equal(p["conv"]["kernel"], t["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["norm"]["scale"], t["norm.weight"])
    np.testing.assert_array_equal(p["norm"]["bias"], -t["norm.bias"])
    np.testing.assert_array_equal(p["bn"]["scale"], t["bn.weight"])
    np.testing.assert_array_equal(bs["bn"]["mean"], t["bn.running_mean"])
    np.testing.assert_array_equal(bs["bn"]["var"], t["bn.running_var"])
    for i in range(2):
        np.testing.assert_array_equal(p[f"layers_{i}"]["kernel"], t[f"layers.{i}.weight"].T)
    model.apply(loaded, *args)  # the model runs with them
    # back to PyTorch names and layout
    data = sc.save_tree(loaded, remap=rules.inverse(like=path))
    back = sc.load(data)
    assert sorted(back) == sorted(k for k in t if k != "bn.num_batches_tracked")
    for k, v in back.items():
        assert v.tobytes() == t[k].tobytes(), k


# ----------------------------------------------------------------------------- operations


def one_tensor(tmp_path, arr: np.ndarray, name: str = "w") -> str:
    path = str(tmp_path / "one.safetensors")
    st_numpy.save_file({name: arr}, path)
    return path


OPS = [
    ("transpose", (R.transpose(2, 0, 1),), lambda a: a.transpose(2, 0, 1)),
    ("split_axis", (R.split_axis(1, (2, -1)),), lambda a: a.reshape(6, 2, 2, 5)),
    ("merge_axes", (R.merge_axes(0, 2),), lambda a: a.reshape(24, 5)),
    ("index_int_step", (R.index(1, slice(None, None, 2)),), lambda a: a[1, ::2]),
    ("index_negative_step_newaxis", (R.index(slice(None, None, -1), None, Ellipsis, 3),),
     lambda a: a[::-1, None, ..., 3]),
    ("transpose_then_merge", (R.transpose(1, 0, 2), R.merge_axes(1, 2)),
     lambda a: a.transpose(1, 0, 2).reshape(4, 30)),
    ("split_then_transpose", (R.split_axis(2, (5, 1)), R.transpose(3, 2, 1, 0)),
     lambda a: a.reshape(6, 4, 5, 1).transpose(3, 2, 1, 0)),
    ("astype", (R.astype("float32"), R.index(slice(2, 4))), lambda a: a.astype(np.float32)[2:4]),
    ("fn", (R.fn(lambda a: a.sum(axis=0)),), lambda a: a.sum(axis=0)),
]


@pytest.mark.parametrize("ops,forward", [o[1:] for o in OPS], ids=[o[0] for o in OPS])
def test_each_operation_matches_numpy(tmp_path, ops, forward) -> None:
    src = np.arange(6 * 4 * 5, dtype=np.int32).reshape(6, 4, 5)
    want = forward(src)
    path = one_tensor(tmp_path, src)
    like = {"x": jax.ShapeDtypeStruct(want.shape, want.dtype), "n": np.zeros(want.shape, want.dtype)}
    rules = R.Rules(R.map("w", ["x"], *ops))
    got = R.plan(path, rules, like={"x": like["x"]}).load()
    np.testing.assert_array_equal(np.asarray(got["x"]), want)
    got = sc.load_tree(path, like={"n": like["n"]}, remap=R.Rules(R.map("w", "n", *ops)))
    assert isinstance(got["n"], np.ndarray)
    np.testing.assert_array_equal(got["n"], want)


def test_chunk_by_count_and_sizes_and_fn_is_whole(tmp_path) -> None:
    src = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    path = one_tensor(tmp_path, src)
    like = {"a": np.zeros((3, 4), np.float32), "b": np.zeros((3, 8), np.float32)}
    rules = R.Rules(R.map("w", ["a", "b"], R.chunk(0, [4, 8]), R.transpose(1, 0)))
    out = sc.load_tree(path, like=like, remap=rules)
    np.testing.assert_array_equal(out["a"], src[:4].T)
    np.testing.assert_array_equal(out["b"], src[4:].T)
    like2 = {"a": np.zeros((6, 3), np.float32), "b": np.zeros((6, 3), np.float32)}
    out = sc.load_tree(path, like=like2, remap=R.Rules(R.map("w", ["a", "b"], R.chunk(0, 2))))
    np.testing.assert_array_equal(out["b"], src[6:])
    p = R.plan(path, R.Rules(R.map("w", "a", R.fn(lambda a: a[:4].T))), like={"a": like["a"]})
    s = p.summary()
    assert s["whole"] == ["a"] and s["total"]["bytes"] == src.nbytes
    np.testing.assert_array_equal(p.load()["a"], src[:4].T)
    # fn's result is checked when it is known: its shape, and a cast it would need
    with pytest.raises(sc.TreeStructureError, match=r"the operations gave \[3, 3\]"):
        sc.load_tree(path, like={"a": like["a"]}, remap=R.Rules(R.map("w", "a", R.fn(lambda a: a[:3]))))
    with pytest.raises(sc.TreeStructureError, match="float64 -> float32 loses"):
        sc.load_tree(path, like={"a": like["a"]},
                     remap=R.Rules(R.map("w", "a", R.fn(lambda a: a[:4].T.astype(np.float64)))))


def test_lossy_casts_need_astype_and_are_listed(tmp_path) -> None:
    src = np.linspace(0, 1, 8, dtype=np.float32)
    path = one_tensor(tmp_path, src)
    like = {"w": jax.ShapeDtypeStruct((8,), jnp.bfloat16)}
    with pytest.raises(sc.TreeStructureError, match=r"refused cast: 'w' -> 'w': float32 -> bfloat16"):
        R.plan(path, R.Rules(R.map("w", "w")), like=like)
    p = R.plan(path, R.Rules(R.map("w", "w", R.astype("bfloat16"))), like=like)
    assert p.summary()["casts"] == ["w: float32 -> bfloat16 (lossy)"]
    np.testing.assert_array_equal(np.asarray(p.load()["w"]), src.astype(ml_dtypes.bfloat16))


def test_placeholders_inside_components_and_specificity(tmp_path) -> None:
    t = {"m.a_proj.weight": np.ones((2, 3), np.float32), "m.b_proj.weight": np.zeros((2, 3), np.float32),
         "m.ab_x.weight": np.full((4,), 2, np.float32)}
    path = str(tmp_path / "p.safetensors")
    st_numpy.save_file(t, path)
    like = {"a": np.zeros((3, 2), np.float32), "b": np.zeros((3, 2), np.float32),
            "x": np.zeros((4,), np.float32)}
    rules = R.Rules(R.map("m.{p}_{q}.weight", "x"),  # less specific: loses the *_proj names
                    R.map("m.{p}_proj.weight", "{p}", R.transpose(1, 0)))
    out = sc.load_tree(path, like=like, remap=rules)
    np.testing.assert_array_equal(out["a"], t["m.a_proj.weight"].T)
    np.testing.assert_array_equal(out["x"], t["m.ab_x.weight"])


def test_one_error_lists_every_problem_in_both_names(hf) -> None:
    directory, _ = hf
    like = dict(flat_state(abstract_state(True)))
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in like.items()}
    like["layers.attn.q"] = jax.ShapeDtypeStruct((L, H, NH, HD + 1), jnp.bfloat16)  # wrong shape
    like["final_norm.scale"] = jax.ShapeDtypeStruct((H,), jnp.float16)  # refused cast
    like["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)  # no rule fills it
    nested = ck.nest(like)
    rules = ck.rules()
    dropped = ("lm_head.weight", "model.layers.{i}.post_attention_layernorm.weight")
    rules = R.Rules(*[m for m in rules.maps if m.source not in dropped],  # unmapped sources
                    R.map("model.missing.{i}", "nothing", stack="i"),  # matches nothing
                    R.map("model.layers.{i}.mlp.down_proj.weight", "layers.mlp.down",
                          R.transpose(2, 0), stack="i"),  # beats {p}_proj; does not apply
                    R.map("{a}_head.weight", "lm_head.kernel"),  # two equally specific rules
                    R.map("lm_{b}ad.weight", "lm_head.kernel"),
                    ignore=rules.ignore)
    with pytest.raises(sc.TreeStructureError) as info:
        R.plan(directory, rules, like=nested)
    msg = str(info.value)
    for needle in [
        "unmapped source: 'model.layers.3.post_attention_layernorm.weight' bfloat16[32]",
        "unfilled target: 'extra' float32[2]",
        "unfilled target: 'layers.mlp_norm' float32[4, 32]",
        "ambiguous source: 'lm_head.weight' is matched equally by map('{a}_head.weight', "
        "'lm_head.kernel') and map('lm_{b}ad.weight', 'lm_head.kernel')",
        "operation does not apply: 'model.layers.0.mlp.down_proj.weight' (and the other stacked "
        "sources) -> 'layers.mlp.down': transpose(2, 0) is not a permutation of 2 axes",
        "rule matches nothing: map('model.missing.{i}', 'nothing', stack='i')",
        "wrong shape: 'model.layers.0.self_attn.qkv_proj.weight' (and the other stacked sources) "
        "-> 'layers.attn.q': the operations give [4, 32, 4, 8], the template wants [4, 32, 4, 9]",
        "refused cast: 'model.norm.weight' -> 'final_norm.scale': float32 -> float16",
        "chunk(0, [32, 16, 16]), transpose(1, 0), split_axis(1, (-1, 8)), stack='i')",
    ]:
        assert needle in msg, (needle, msg)
    # each problem once: a leaf with a problem of its own is not also "unfilled"; a rule
    # whose names went to more specific rules did match something
    assert "unfilled target: 'layers.attn.q'" not in msg and "{p}_proj" not in msg
    assert msg.count("operation does not apply") == 1
    assert msg.startswith("the checkpoint does not map onto the template: ")


def test_stack_errors_and_rule_checks(tmp_path) -> None:
    t = {"l.0.w": np.ones(2, np.float32), "l.2.w": np.ones(2, np.float32),
         "l.x.w": np.ones(2, np.float32)}
    path = str(tmp_path / "s.safetensors")
    st_numpy.save_file(t, path)
    with pytest.raises(sc.TreeStructureError) as info:
        R.plan(path, R.Rules(R.map("l.{i}.w", "w", stack="i")), like={"w": np.zeros((3, 2), np.float32)})
    msg = str(info.value)
    assert "incomplete stack" in msg and "l.1.w" in msg
    assert "stack='i' needs numbers: 'l.x.w'" in msg
    with pytest.raises(sc.SafecodecError, match="not in the source"):
        R.map("a.{i}", "b.{j}")
    with pytest.raises(sc.SafecodecError, match="need a chunk"):
        R.map("a", ["b", "c"])
    with pytest.raises(sc.SafecodecError, match="makes 2 pieces for 3 targets"):
        R.map("a", ["b", "c", "d"], R.chunk(0, 2))
    with pytest.raises(sc.SafecodecError, match="stack='k' is not a placeholder"):
        R.map("a.{i}", "b", stack="k")
    with pytest.raises(sc.SafecodecError, match="not an operation"):
        R.map("a", "b", np.transpose)  # type: ignore[arg-type]
    with pytest.raises(sc.SafecodecError, match="inverted"):
        R.plan(path, R.Rules(R.map("l.{i}.w", "w")).inverse(), like={})
    with pytest.raises(sc.SafecodecError, match="needs like="):
        sc.load_tree(path, remap=R.Rules())
    with pytest.raises(sc.TreeStructureError, match="only basic indices"):
        R.plan(path, R.Rules(R.map("l.0.w", "w", R.index([0, 1])), ignore=["l.[x2].w"]),
               like={"w": np.zeros(2, np.float32)})
    with pytest.raises(sc.SafecodecError, match="cannot be inverted"):
        sc.save_tree({"w": np.zeros(2, np.float32)}, remap=R.Rules(R.map("l.0.w", "w", R.index(0))).inverse())


def test_optional_rules_and_inverse_of_inverse(tmp_path) -> None:
    path = one_tensor(tmp_path, np.ones((2, 2), np.float32))
    rules = R.Rules(R.map("w", "w"), R.map("q_norm.weight", "qn", optional=True))
    out = sc.load_tree(path, like={"w": np.zeros((2, 2), np.float32)}, remap=rules)
    assert out["w"].shape == (2, 2)
    assert rules.inverse().inverse() == rules and rules.inverse() != rules


def test_remap_is_a_lazy_submodule() -> None:
    code = ("import sys, safecodec; print('jax' in sys.modules, 'safecodec.remap' in sys.modules); "
            "from safecodec import remap; print(safecodec.remap is remap, 'remap' in dir(safecodec))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    assert out.stdout.split() == ["False", "False", "True", "True"]


# ----------------------------------------------------------------------------- device blocks


def test_device_blocks_under_real_shardings(hf, tmp_path) -> None:
    """8 CPU devices (a child process): every operation under many shardings, each device
    block read as boxes, values equal to NumPy, replicated blocks read once."""
    directory, _ = hf
    env = cpu_device_env(8, PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "remap_sharding_worker.py"),
                           directory, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["checked"] >= 60, result
    # a column-sharded (N, 2) tensor: one box per block, host memory ~ its bytes, not rows
    assert result["column_blocks"] == 2
    assert result["column_peak_ratio"] <= 2.0, result


def test_save_tree_with_plain_rules_runs_them_forward() -> None:
    tree = {"w": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)],
            "b": np.zeros(3, np.float32)}
    rules = R.Rules(R.map("w.{i}", "stacked", R.transpose(1, 0), stack="i"), R.map("b", "bias"))
    back = sc.load(sc.save_tree(tree, remap=rules))
    assert sorted(back) == ["bias", "stacked"]
    np.testing.assert_array_equal(back["stacked"], np.stack([t.T for t in tree["w"]]))
    with pytest.raises(sc.TreeStructureError, match="unmapped tree leaf: 'b'"):
        sc.save_tree(tree, remap=R.Rules(R.map("w.{i}", "stacked", stack="i")))


def test_tiled_copy_agrees_with_numpy() -> None:
    """The fast path for transposed blocks (integer views, coalesced axes, tiles) gives
    exactly what ``np.copyto`` gives, on generated layouts."""
    from safecodec.remap import _copy_into

    rng = np.random.default_rng(3)
    tiled = 0
    for _ in range(120):
        nd = int(rng.integers(2, 5))
        shape = tuple(int(x) for x in rng.integers(2, 60, nd))
        dtype = [ml_dtypes.bfloat16, np.float32, np.int8, np.float16][int(rng.integers(0, 4))]
        base = (rng.standard_normal(shape) * 50).astype(dtype)
        src = base.transpose(rng.permutation(nd))
        src = src[tuple(slice(int(rng.integers(0, 2)), None, int(rng.integers(1, 3)))
                        for _ in range(nd))]
        if rng.random() < 0.3:
            src = src[::-1]
        if rng.random() < 0.3:  # a length-1 axis somewhere (a column block)
            axis = int(rng.integers(0, nd))
            src = src[(slice(None),) * axis + (slice(0, 1),)]
        for out_dtype in (src.dtype, np.dtype(np.float32)):
            want = np.empty(src.shape, out_dtype)
            got = np.empty(src.shape, out_dtype)
            np.copyto(want, src, casting="unsafe")
            _copy_into(got, src)
            assert want.tobytes() == got.tobytes(), (shape, src.strides, out_dtype)
        tiled += src.size >= 1 << 14 and src.strides[-1] != src.itemsize
    assert tiled >= 10  # the tiled path ran, not only the plain copy
    column = np.arange(2 * 20000, dtype=np.float32).reshape(20000, 2)[:, 1:2]
    got = np.empty(column.shape, np.float32)
    _copy_into(got, column)
    np.testing.assert_array_equal(got, column)


def test_remote_checkpoint_reads_only_the_boxes(hf) -> None:
    """An fsspec source (``memory://``): every box of a target in one plan of the read
    engine; values as from the local files; far fewer bytes than the file for a slice."""
    fsspec = pytest.importorskip("fsspec")
    directory, t = hf
    fs = fsspec.filesystem("memory")
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as src, fs.open(f"/remap-hf/{name}", "wb") as dst:
            dst.write(src.read())
    state = sc.load_tree("memory://remap-hf", like=abstract_state(True), remap=ck.rules())
    want = ck.reference(t)
    for name, arr in flat_state(state).items():
        np.testing.assert_array_equal(np.asarray(arr), want[name], err_msg=name)
    # one column block of one stacked target: the plan's bytes are what the source serves
    rules = R.Rules(R.map("model.layers.{i}.mlp.down_proj.weight", "w", R.transpose(1, 0),
                          R.index(slice(None), slice(0, 8)), stack="i"),
                    ignore=[r"(?!model\.layers\.\d+\.mlp\.down_proj).*"])
    with sc.safe_open("memory://remap-hf") as handle:
        like = {"w": jax.ShapeDtypeStruct((L, FF, 8), jnp.bfloat16)}
        plan = R.plan(handle, rules, like=like)
        planned = plan.summary()["total"]["bytes"]
        before = handle.stats["bytes_read"]
        out = plan.load()["w"]
        read = handle.stats["bytes_read"] - before
    np.testing.assert_array_equal(
        np.asarray(out), np.stack([t[f"model.layers.{i}.mlp.down_proj.weight"].T[:, :8] for i in range(L)]))
    assert planned == L * 8 * FF * 2
    assert 0 < read <= 1.25 * L * 8 * FF * 2 + 4096  # the box, within the engine's read budget
