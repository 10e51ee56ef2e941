#!/usr/bin/env python3
"""Weight sizes of each Tessera component per DeepSeek-VL2 variant.

Counts parameters from a released `config.json` (the tensor shapes its
`language_config` / `vision_config` / `projector_config` keys give the reference
modules, with `DeepseekV2Config` defaults for absent keys, and the released
checkpoint names) and splits them the way
the services load them:

- vision-worker: `vision.*` without the unused `vision.attn_pool.*` head, the
  projector, `image_newline` and `view_seperator`, in the vision-worker's --dtype;
- scheduler: every language tensor except the routed experts (embeddings,
  attention, the dense first layer, gates, shared experts, norms, lm_head), in the
  scheduler's --dtype;
- expert-workers: the routed experts, always held in f32, split evenly over the
  expert-workers by the placement;
- snapshot: every tensor as released (bf16), i.e. the model volume's size.

    python3 deploy/tests/model_sizes.py                  # the table in deploy/README.md
    python3 deploy/tests/model_sizes.py --verify-checkpoint DIR
        # compare the formulas with the tensor shapes of a checkpoint, e.g. one
        # written by `tessera init-random --variant tiny --layers 2 --vision-layers 1`

check_manifests.py imports `component_bytes` to check that the manifests'
memory limits hold the weights of the model they deploy.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
from dataclasses import dataclass

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASED = os.path.join(REPO, "tests", "fixtures", "released-configs")

# Hub repository name -> folder under tests/fixtures/released-configs.
VARIANTS = {
    "deepseek-vl2-tiny": "Tiny",
    "deepseek-vl2-small": "Small",
    "deepseek-vl2": "Base",
}

# DeepseekV2Config defaults (configuration_deepseek.py) for keys a released language_config omits.
LANGUAGE_DEFAULTS = {
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "use_mla": True,
    "first_k_dense_replace": 0,
    "topk_method": "gready",
}

# SigLIP-SO400M-384 as every variant uses it (the released `vision_config` / `projector_config`).
VISION_PATCHES = 27 * 27
VISION_IN_CHANNELS = 3
PROJECTOR_INPUT = 4 * 1152

BYTES = {"f32": 4, "f16": 2, "bf16": 2}
GIB = 1024**3


@dataclass(frozen=True)
class Params:
    """Parameter counts of the groups the services load."""

    vision: int
    scheduler: int
    routed_experts: int
    attn_pool: int

    @property
    def total(self) -> int:
        return self.vision + self.scheduler + self.routed_experts + self.attn_pool


def language_config(config: dict) -> dict:
    lang = dict(LANGUAGE_DEFAULTS)
    lang.update({k: v for k, v in config["language_config"].items() if v is not None})
    return lang


def count(config: dict, layers: int | None = None, vision_layers: int | None = None) -> Params:
    """Parameters of `config`, optionally with fewer language / vision layers."""
    lang = language_config(config)
    h = lang["hidden_size"]
    vocab = lang["vocab_size"]
    n_layers = layers if layers is not None else lang["num_hidden_layers"]
    dense_layers = min(lang["first_k_dense_replace"], n_layers)
    moe_layers = n_layers - dense_layers
    heads = lang["num_attention_heads"]
    n_experts = lang["n_routed_experts"]
    moe_inter = lang["moe_intermediate_size"]

    if lang.get("use_mla", True) and lang.get("kv_lora_rank"):
        rank, nope, rope, v = (
            lang["kv_lora_rank"],
            lang["qk_nope_head_dim"],
            lang["qk_rope_head_dim"],
            lang["v_head_dim"],
        )
        attention = (
            h * heads * (nope + rope)  # q_proj (q_lora_rank is null in every release)
            + h * (rank + rope)  # kv_a_proj_with_mqa
            + rank  # kv_a_layernorm
            + rank * heads * (nope + v)  # kv_b_proj
            + heads * v * h  # o_proj
        )
    else:
        attention = 4 * h * h  # q, k, v, o: heads × head_dim = hidden
    norms = 2 * h
    dense_mlp = 3 * h * lang["intermediate_size"]
    gate = n_experts * h + (n_experts if lang["topk_method"] == "noaux_tc" else 0)
    shared = 3 * h * moe_inter * lang["n_shared_experts"]
    routed = n_experts * 3 * h * moe_inter

    scheduler = (
        2 * vocab * h  # embed_tokens, lm_head
        + h  # final norm
        + n_layers * (attention + norms)
        + dense_layers * dense_mlp
        + moe_layers * (gate + shared)
    )

    vis = config.get("vision_config", {})
    width = vis.get("width", 1152)
    patch = vis.get("patch_size", 14)
    mlp = int(width * vis.get("mlp_ratio", 3.7362))
    blocks = vision_layers if vision_layers is not None else vis.get("layers", 27)
    block = (
        4 * width  # norm1, norm2 (weight + bias)
        + width * 3 * width + 3 * width  # qkv
        + width * width + width  # proj
        + width * mlp + mlp + mlp * width + width  # fc1, fc2
    )
    n_embed = config["projector_config"]["n_embed"]
    vision = (
        width * VISION_IN_CHANNELS * patch * patch + width  # patch_embed
        + VISION_PATCHES * width  # pos_embed
        + blocks * block
        + 2 * width  # final norm
        + PROJECTOR_INPUT * n_embed + n_embed + n_embed * n_embed + n_embed  # projector
        + 2 * n_embed  # image_newline, view_seperator
    )
    attn_pool = (
        width  # latent
        + width * width + width  # q
        + width * 2 * width + 2 * width  # kv
        + width * width + width  # proj
        + 2 * width  # norm
        + width * mlp + mlp + mlp * width + width  # mlp
    )
    return Params(vision, scheduler, moe_layers * routed, attn_pool)


def load_config(name: str) -> dict:
    """The released config.json of Hub repository `name` (`deepseek-vl2-tiny`, ...)."""
    with open(os.path.join(RELEASED, name, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def component_bytes(
    name: str, expert_workers: int, scheduler_dtype: str = "f32", vision_dtype: str = "f32"
) -> dict[str, int]:
    """Bytes of weights each component of variant `name` holds in memory."""
    p = count(load_config(name))
    return {
        "vision-worker": p.vision * BYTES[vision_dtype],
        "scheduler": p.scheduler * BYTES[scheduler_dtype],
        "expert-worker": -(-p.routed_experts * BYTES["f32"] // expert_workers),
        "snapshot": p.total * BYTES["bf16"],
    }


def read_safetensors_shapes(folder: str) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        shapes.update({k: v["shape"] for k, v in header.items()})
    return shapes


def verify_checkpoint(folder: str) -> int:
    """Compares the formulas with the tensors of the checkpoint in `folder`."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    shapes = read_safetensors_shapes(folder)
    blocks = len({k.split(".")[2] for k in shapes if k.startswith("vision.blocks.")})
    got = {"vision": 0, "scheduler": 0, "routed_experts": 0, "attn_pool": 0}
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        if key.startswith("vision.attn_pool."):
            got["attn_pool"] += n
        elif key.startswith(("vision.", "projector.", "image_newline", "view_seperator")):
            got["vision"] += n
        elif ".mlp.experts." in key:
            got["routed_experts"] += n
        else:
            got["scheduler"] += n
    want = count(config, vision_layers=blocks).__dict__
    ok = True
    for group, n in got.items():
        mark = "ok" if n == want[group] else "MISMATCH"
        ok &= n == want[group]
        print(f"{group:15} checkpoint {n:>14,}  formula {want[group]:>14,}  {mark}")
    return 0 if ok else 1


def kv_bytes_per_token(config: dict, dtype: str = "f32") -> int:
    """KV-cache bytes one token takes in the scheduler: keys and values per layer
    (MHA), or the compressed latent and the rope key (MLA)."""
    lang = language_config(config)
    if lang.get("use_mla", True) and lang.get("kv_lora_rank"):
        width = lang["kv_lora_rank"] + lang["qk_rope_head_dim"]
    else:
        width = 2 * lang["hidden_size"]
    return lang["num_hidden_layers"] * width * BYTES[dtype]


def table() -> str:
    rows = [
        "| variant | snapshot (bf16) | vision-worker (f32) | scheduler (f32 / bf16) "
        "| KV cache per token (f32) | routed experts (f32, all workers) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    shares = [
        "| variant | N = 1 | N = 2 | N = 4 | N = 8 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in VARIANTS.items():
        config = load_config(name)
        p = count(config)
        rows.append(
            f"| {label} | {p.total * 2 / GIB:.1f} GiB "
            f"| {p.vision * 4 / GIB:.1f} GiB "
            f"| {p.scheduler * 4 / GIB:.1f} / {p.scheduler * 2 / GIB:.1f} GiB "
            f"| {kv_bytes_per_token(config) / 1024:.0f} KiB "
            f"| {p.routed_experts * 4 / GIB:.1f} GiB |"
        )
        shares.append(
            f"| {label} | "
            + " | ".join(f"{p.routed_experts * 4 / n / GIB:.1f} GiB" for n in (1, 2, 4, 8))
            + " |"
        )
    totals = ", ".join(
        f"{label} {count(load_config(name)).total / 1e9:.3f} B" for name, label in VARIANTS.items()
    )
    return "\n".join(rows + ["", "Routed experts per expert-worker:", ""] + shares
                     + ["", f"Parameters: {totals}."])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verify-checkpoint", metavar="DIR")
    args = parser.parse_args()
    if args.verify_checkpoint:
        return verify_checkpoint(args.verify_checkpoint)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
