"""Real models of each framework: save, load, and the restored model computes exactly
what the original computes."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import safecodec as sc  # noqa: E402
from safecodec._tree import SkippedLeavesWarning  # noqa: E402


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


# ----------------------------------------------------------------------------- Flax linen


def linen_model():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(8, param_dtype=jnp.bfloat16, dtype=jnp.float32)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2)(nn.relu(x))

    return Net()


def test_flax_linen_variables_with_batch_stats_and_bf16(tmp_path):
    model = linen_model()
    from flax.core import FrozenDict
    from flax.traverse_util import flatten_dict

    variables = model.init(jax.random.key(0), X)
    # one training step so batch_stats are not the initial values
    _, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}
    path = tmp_path / "linen.safetensors"
    sc.save_tree(variables, path, metadata={"model": "Net"})
    names = set(sc.read_header(path).tensors)
    assert names == set(flatten_dict(variables, sep="."))
    assert sc.read_header(path).tensors["params.Dense_0.kernel"].dtype.code == "BF16"
    expected = model.apply(variables, X)

    restored = sc.load_tree(path, framework="jax")
    assert_same_tree(variables, restored)
    np.testing.assert_array_equal(np.asarray(model.apply(restored, X)), np.asarray(expected))

    like = jax.eval_shape(lambda: variables)
    from_template = sc.load_tree(path, like=like)
    np.testing.assert_array_equal(np.asarray(model.apply(from_template, X)), np.asarray(expected))

    frozen, md = sc.deserialize(path, freeze_dict=True)
    assert isinstance(frozen, FrozenDict) and md == {"model": "Net"}
    np.testing.assert_array_equal(np.asarray(model.apply(frozen, X)), np.asarray(expected))


def test_flax_linen_file_from_safetensors_flax_loads_into_the_tree(tmp_path):
    stf = pytest.importorskip("safetensors.flax")
    model = linen_model()
    from flax.traverse_util import flatten_dict

    variables = model.init(jax.random.key(1), X)
    path = tmp_path / "ref.safetensors"
    stf.save_file(flatten_dict(variables, sep="."), str(path))
    like = jax.eval_shape(lambda: variables)
    restored = sc.load_tree(path, like=like)
    assert_same_tree(variables, restored)
    np.testing.assert_array_equal(np.asarray(model.apply(restored, X)),
                                  np.asarray(model.apply(variables, X)))


def test_flax_frozen_dict_conveniences():
    pytest.importorskip("flax")
    from flax.core import FrozenDict, freeze

    import safecodec.flax as scf

    variables = freeze(linen_model().init(jax.random.key(2), X))
    out = scf.deserialize(scf.serialize(variables))
    assert isinstance(out, FrozenDict)
    assert_same_tree(variables.unfreeze(), out.unfreeze())
    like_frozen = sc.load_tree(sc.save_tree(variables), like=variables)
    assert isinstance(like_frozen, FrozenDict)


# ----------------------------------------------------------------------------- Flax NNX


def nnx_model(seed):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])
            self.bn = nnx.BatchNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.layers[1](nnx.relu(self.bn(self.layers[0](x))))

    return Net(nnx.Rngs(seed))


def test_flax_nnx_state_round_trip_and_update(tmp_path):
    model = nnx_model(0)
    from flax import nnx

    model.train()
    model(X)  # update BatchStat
    model.eval()
    expected = model(X)
    state = nnx.state(model)
    path = tmp_path / "nnx.safetensors"
    sc.save_tree(state, path)
    names = set(sc.read_header(path).tensors)
    assert "layers.0.kernel" in names and "bn.mean" in names
    assert not any(n.endswith(".value") for n in names)

    fresh = nnx_model(1)
    fresh.eval()
    before = np.asarray(fresh.layers[0].kernel[...]).copy()
    restored = sc.load_tree(path, like=nnx.state(fresh))
    np.testing.assert_array_equal(np.asarray(fresh.layers[0].kernel[...]), before)  # untouched
    assert type(restored) is type(state)
    assert type(restored["bn"]["mean"]) is nnx.BatchStat
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(np.asarray(fresh(X)), np.asarray(expected))

    abstract = nnx.state(nnx.eval_shape(lambda: nnx_model(2)))
    restored2 = sc.load_tree(path, like=abstract)
    other = nnx_model(3)
    other.eval()
    nnx.update(other, restored2)
    np.testing.assert_array_equal(np.asarray(other(X)), np.asarray(expected))


def test_flax_nnx_without_template_gives_a_pure_dict_with_int_keys(tmp_path):
    model = nnx_model(0)
    from flax import nnx

    model.eval()
    pure = sc.load_tree(sc.save_tree(nnx.state(model)), framework="jax")
    assert set(pure) == {"layers", "bn"} and set(pure["layers"]) == {0, 1}
    fresh = nnx_model(5)
    fresh.eval()
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(fresh, state)
    np.testing.assert_array_equal(np.asarray(fresh(X)), np.asarray(model(X)))


# ----------------------------------------------------------------------------- Haiku


def test_haiku_params_and_state(tmp_path):
    hk = pytest.importorskip("haiku")
    import safecodec.haiku as sch

    def forward(x, is_training):
        x = hk.nets.MLP([8, 8], name="mlp")(x)
        x = hk.BatchNorm(True, True, 0.9)(x, is_training)
        return hk.Linear(2)(x)

    f = hk.without_apply_rng(hk.transform_with_state(forward))
    params, state = f.init(jax.random.key(0), X, True)
    _, state = f.apply(params, state, X, True)
    expected, _ = f.apply(params, state, X, False)
    path = tmp_path / "hk.safetensors"
    sch.save(params, path, state=state)
    names = set(sc.read_header(path).tensors)
    assert "params.mlp/~/linear_0.w" in names and any(n.startswith("state.batch_norm") for n in names)
    p2, s2 = sch.load(path, with_state=True)
    assert_same_tree(params, p2)
    assert_same_tree(state, s2)
    out, _ = f.apply(p2, s2, X, False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # params alone, safejax names (mlp/~/linear_0.w)
    data = sc.serialize(params)
    assert "mlp/~/linear_0.w" in sc.read_header(data).tensors
    assert_same_tree(params, sc.deserialize(data))
    with pytest.raises(sc.TreeStructureError, match=r"with_state=True needs a file saved with state="):
        sch.load(data, with_state=True)


# ----------------------------------------------------------------------------- Objax


def test_objax_var_collection_model_outputs(tmp_path):
    objax = pytest.importorskip("objax")
    import safecodec.objax as sco

    def make():
        return objax.nn.Sequential([objax.nn.Linear(4, 8), objax.functional.relu,
                                    objax.nn.BatchNorm0D(8), objax.nn.Linear(8, 2)])

    model = make()
    model(X, training=True)  # move the running statistics
    expected = model(X, training=False)
    path = tmp_path / "objax.safetensors"
    sco.save(model, path)
    vc = sco.load(path)
    assert [type(v) for v in vc.values()] == [type(v) for v in model.vars().values()]
    fresh = make()
    sco.load_into(fresh, path)
    np.testing.assert_array_equal(np.asarray(fresh(X, training=False)), np.asarray(expected))
    again = sc.load_tree(path, like=model.vars())
    assert [type(v) for v in again.values()] == [type(v) for v in model.vars().values()]
    assert all(a is not b for a, b in zip(again.values(), model.vars().values(), strict=True))


def test_objax_deserialize_with_assignment_as_safejax(tmp_path):
    objax = pytest.importorskip("objax")
    import safecodec.objax as sco

    def make(seed):
        objax.random.DEFAULT_GENERATOR.seed(seed)
        return objax.nn.Sequential([objax.nn.Linear(4, 8), objax.functional.relu,
                                    objax.nn.BatchNorm0D(8), objax.nn.Linear(8, 2)])

    model = make(0)
    model(X, training=True)
    expected = np.asarray(model(X, training=False))
    path = tmp_path / "objax.safetensors"
    sco.serialize(model.vars(), filename=str(path))  # safejax style: "::TrainVar" suffixes
    fresh = make(1)
    assert not np.array_equal(np.asarray(fresh(X, training=False)), expected)
    fresh_vars = fresh.vars()
    assert sco.deserialize_with_assignment(filename=str(path), model_vars=fresh_vars) is None
    np.testing.assert_array_equal(np.asarray(fresh(X, training=False)), expected)

    smaller = objax.nn.Sequential([objax.nn.Linear(4, 8)])
    with pytest.raises(sc.TreeStructureError, match=r"0 missing, 6 unexpected, 0 mismatched"):
        sco.deserialize_with_assignment(str(path), smaller.vars())
    wider = objax.nn.Sequential([objax.nn.Linear(4, 9), objax.functional.relu,
                                 objax.nn.BatchNorm0D(9), objax.nn.Linear(9, 2)])
    before = [np.asarray(v.value).copy() for v in wider.vars().values()]
    with pytest.raises(ValueError, match=r"mismatched \(model vs file\): '\(Sequential\)\[0\]\(Linear\).b': model float32\[9\], file float32\[8\]"):
        sco.deserialize_with_assignment(str(path), wider.vars())
    after = [np.asarray(v.value) for v in wider.vars().values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))  # nothing assigned


def test_every_public_name_of_safejax_exists():
    """safejax 0.4's public names (safejax, .flax, .haiku, .objax) all have a counterpart."""
    import importlib

    wanted = {"safecodec": ["serialize", "deserialize"],
              "safecodec.flax": ["serialize", "deserialize"],
              "safecodec.haiku": ["serialize", "deserialize"],
              "safecodec.objax": ["serialize", "deserialize", "deserialize_with_assignment"]}
    for module, names in wanted.items():
        mod = importlib.import_module(module)
        for name in names:
            assert callable(getattr(mod, name)), (module, name)
            assert name in mod.__all__, (module, name)


# ----------------------------------------------------------------------------- Equinox


def test_equinox_mlp_with_activation_functions(tmp_path):
    eqx = pytest.importorskip("equinox")

    mlp = eqx.nn.MLP(4, 2, 8, 2, activation=jax.nn.gelu, key=jax.random.key(0))
    expected = jax.vmap(mlp)(X)
    path = tmp_path / "eqx.safetensors"
    sc.save_tree(mlp, path)
    assert "layers.0.weight" in sc.read_header(path).tensors

    like = eqx.nn.MLP(4, 2, 8, 2, activation=jax.nn.gelu, key=jax.random.key(7))
    restored = sc.load_tree(path, like=like)
    assert type(restored) is type(mlp) and restored.activation is jax.nn.gelu
    np.testing.assert_array_equal(np.asarray(jax.vmap(restored)(X)), np.asarray(expected))

    abstract = eqx.filter_eval_shape(eqx.nn.MLP, 4, 2, 8, 2, activation=jax.nn.gelu, key=jax.random.key(0))
    restored2 = sc.load_tree(path, like=abstract)
    np.testing.assert_array_equal(np.asarray(jax.vmap(restored2)(X)), np.asarray(expected))

    with pytest.warns(SkippedLeavesWarning, match=r"\.activation, \.final_activation"):
        plain = sc.load_tree(path)
    assert plain["activation"] is None and plain["layers"][0]["weight"].shape == (8, 4)

    wrong = eqx.filter_eval_shape(eqx.nn.MLP, 4, 2, 16, 2, key=jax.random.key(0))
    with pytest.raises(sc.TreeStructureError, match=r"\.layers\[0\]\.weight: template float32\[16, 4\], file 'layers.0.weight' float32\[8, 4\]"):
        sc.load_tree(path, like=wrong)
