"""A tiny Llama-shaped checkpoint in Hugging Face layout, written by the reference wheel,
and an independent NumPy transform of it (used by the remap tests and their workers).

The checkpoint is what ``save_pretrained`` writes for a model with fused projections
(Phi-3 style ``qkv_proj`` and ``gate_up_proj``): ``(out, in)`` Linear weights, one tensor
per layer, bf16, ``{"format": "pt"}`` metadata, 8-aligned (the wheel's layout), sharded in
3 files with a ``model.safetensors.index.json`` in Hugging Face's format.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

H, NH, KV, HD, FF, L, V = 32, 4, 2, 8, 48, 4, 64  # hidden, heads, kv heads, head dim, feed-forward, layers, vocab
BF16 = ml_dtypes.bfloat16
INDEX = "model.safetensors.index.json"


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by name (bf16 weights, one f32 buffer to ignore)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(BF16)

    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H), "lm_head.weight": w(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "self_attn.qkv_proj.weight"] = w((NH + 2 * KV) * HD, H)
        t[p + "self_attn.o_proj.weight"] = w(H, NH * HD)
        t[p + "mlp.gate_up_proj.weight"] = w(2 * FF, H)
        t[p + "mlp.down_proj.weight"] = w(H, FF)
        t[p + "input_layernorm.weight"] = w(H)
        t[p + "post_attention_layernorm.weight"] = w(H)
        t[p + "self_attn.rotary_emb.inv_freq"] = np.arange(HD // 2, dtype=np.float32)
    return t


def write(directory: str | os.PathLike[str], seed: int = 0, shards: int = 3) -> dict[str, np.ndarray]:
    """Write the checkpoint with ``safetensors.numpy.save_file`` in ``shards`` files plus
    the index; returns the tensors."""
    from safetensors.numpy import save_file

    t = tensors(seed)
    names = list(t)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    os.makedirs(directory, exist_ok=True)
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: t[n] for n in part}, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update((n, fname) for n in part)
        total += sum(t[n].nbytes for n in part)
    with open(os.path.join(directory, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return t


def reference(t: dict[str, np.ndarray], *, scanned: bool = True) -> dict[str, np.ndarray]:
    """The model's leaves from the tensors, by plain NumPy (the oracle): names as
    :func:`rules` targets them."""
    out: dict[str, np.ndarray] = {
        "embed.embedding": t["model.embed_tokens.weight"].astype(np.float32),
        "final_norm.scale": t["model.norm.weight"].astype(np.float32),
        "lm_head.kernel": t["lm_head.weight"].T,
    }
    per: dict[str, list[np.ndarray]] = {}
    for i in range(L):
        p = f"model.layers.{i}."
        qkv = t[p + "self_attn.qkv_proj.weight"]
        gu = t[p + "mlp.gate_up_proj.weight"]
        leaves = {
            "attn.q": qkv[:NH * HD].T.reshape(H, NH, HD),
            "attn.k": qkv[NH * HD:(NH + KV) * HD].T.reshape(H, KV, HD),
            "attn.v": qkv[(NH + KV) * HD:].T.reshape(H, KV, HD),
            "attn.o": t[p + "self_attn.o_proj.weight"].T.reshape(NH, HD, H),
            "mlp.gate": gu[:FF].T,
            "mlp.up": gu[FF:].T,
            "mlp.down": t[p + "mlp.down_proj.weight"].T,
            "attn_norm": t[p + "input_layernorm.weight"].astype(np.float32),
            "mlp_norm": t[p + "post_attention_layernorm.weight"].astype(np.float32),
        }
        for k, v in leaves.items():
            if scanned:
                per.setdefault(f"layers.{k}", []).append(v)
            else:
                out[f"layers.{i}.{k}"] = np.ascontiguousarray(v)
    out.update((k, np.stack(v)) for k, v in per.items())
    return out


def rules(*, scanned: bool = True) -> Any:
    """The remap table for :func:`reference`'s names (scanned: stacked on layers)."""
    from safecodec import remap as R

    lay = "layers" if scanned else "layers.{i}"
    st = {"stack": "i"} if scanned else {}
    return R.Rules(
        R.map("model.embed_tokens.weight", "embed.embedding"),
        R.map("model.layers.{i}.self_attn.qkv_proj.weight",
              [f"{lay}.attn.q", f"{lay}.attn.k", f"{lay}.attn.v"],
              R.chunk(0, (NH * HD, KV * HD, KV * HD)), R.transpose(1, 0),
              R.split_axis(1, (-1, HD)), **st),
        R.map("model.layers.{i}.self_attn.o_proj.weight", f"{lay}.attn.o",
              R.transpose(1, 0), R.split_axis(0, (NH, HD)), **st),
        R.map("model.layers.{i}.mlp.gate_up_proj.weight", [f"{lay}.mlp.gate", f"{lay}.mlp.up"],
              R.chunk(0, 2), R.transpose(1, 0), **st),
        R.map("model.layers.{i}.mlp.{p}_proj.weight", f"{lay}.mlp.{{p}}", R.transpose(1, 0), **st),
        R.map("model.layers.{i}.input_layernorm.weight", f"{lay}.attn_norm", **st),
        R.map("model.layers.{i}.post_attention_layernorm.weight", f"{lay}.mlp_norm", **st),
        R.map("model.norm.weight", "final_norm.scale", R.astype("float32")),
        R.map("lm_head.weight", "lm_head.kernel", R.transpose(1, 0)),
        ignore=[r".*rotary_emb\.inv_freq"],
    )


def nest(flat: dict[str, object]) -> dict[str, object]:
    """``{"a.b": x}`` -> ``{"a": {"b": x}}``: a template's flat leaf names as nested dicts."""
    root: dict[str, object] = {}
    for k, v in flat.items():
        node = root
        *head, last = k.split(".")
        for part in head:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[last] = v  # type: ignore[index]
    return root
