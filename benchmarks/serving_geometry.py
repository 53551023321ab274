"""Prefill FLOPs and KV cache of ALVTS runtimes inside a paged-KV engine, from the 7B geometries (docs/SERVING.md).

Arithmetic only (no model runs). Per decoder layer, with n visual tokens, T text tokens and k visual tokens
processed at a compression (`alvts eval`'s count, the pooled stand-in among the k):
- `default`: this toolkit's runtime; the k tokens and the text run the whole layer and only they are cached.
- `keys-all`: every token's key and value are computed and cached (from the skipped tokens' current states);
  queries, attention, output projection and MLP run on the k tokens and the text.
- `engine`: what an unmodified engine's attention allows: queries, keys, values and attention for every token
  (one set of attention metadata for all layers), output projection and MLP on the k tokens and the text.
FLOPs count matmuls as `alvts_calib.evaluation.flops` does; attention for a subset of queries is that share of the full
causal attention. KV cache is bf16.

    python benchmarks/serving_geometry.py [--compressions 0.67,0.78,0.89] [--text-tokens 60]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from alvts_calib.evaluation import attention_flops, keys_all_layer_flops, layer_flops, projection_flops
from alvts_calib.model import AttentionGeometry
from alvts_calib.tokens import per_layer_count

KV_BYTES = 2  # bf16


@dataclass(frozen=True)
class Geometry:
    """A 7B decoder and its visual tokens per image (from the public configs)."""

    name: str
    attention: AttentionGeometry
    intermediate: int
    visual_tokens: int


GEOMETRIES = (
    Geometry("LLaVA-1.5-7B (Vicuna-7B, MHA)", AttentionGeometry(32, 4096, 32, 32, 128), 11008, 576),
    Geometry("LLaVA-NeXT-7B (Vicuna-7B, MHA; 672x672)", AttentionGeometry(32, 4096, 32, 32, 128), 11008, 2928),
    Geometry("LLaVA-NeXT-7B (Mistral-7B, GQA 32:8; 672x672)", AttentionGeometry(32, 4096, 32, 8, 128), 14336, 2928),
    Geometry("Qwen2.5-VL-7B (Qwen2.5-7B, GQA 28:4; 672x672)", AttentionGeometry(28, 3584, 28, 4, 128), 18944, 576),
)


def costs(geometry: Geometry, compression: float, text: int) -> dict[str, float]:
    """Prefill FLOPs relative to the unpruned model, per runtime, and each runtime's KV cache in MiB."""
    attention, n = geometry.attention, geometry.visual_tokens
    k = per_layer_count(1.0 - compression, attention.num_layers, n, 0)
    total, processed = n + text, k + text
    unit = projection_flops(attention, geometry.intermediate)
    full = layer_flops(total, attention, geometry.intermediate)
    default = layer_flops(processed, attention, geometry.intermediate)
    keys_all = keys_all_layer_flops(processed, total, attention, geometry.intermediate)
    engine = (total * (unit["q"] + unit["kv"]) + attention_flops(total, attention)
              + processed * (unit["o"] + unit["mlp"]))
    kv_token = 2 * attention.num_kv_heads * attention.head_dim * KV_BYTES * attention.num_layers / 2**20
    return {"k": k, "default": default / full, "keys-all": keys_all / full, "engine": engine / full,
            "kv_default_mib": processed * kv_token, "kv_all_mib": total * kv_token,
            "skipped_kv_share": unit["kv"] / sum(unit.values()),
            "skipped_engine_share": (unit["q"] + unit["kv"]) / sum(unit.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compressions", default="0.67,0.78,0.89")
    parser.add_argument("--text-tokens", type=int, default=60)
    args = parser.parse_args()
    print("| model | compression | visual tokens per layer | prefill FLOPs: default | keys-all | engine "
          "| KV cache MiB: default | keys-all and engine | skipped token's projections: keys-all | engine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for geometry in GEOMETRIES:
        for compression in (float(c) for c in args.compressions.split(",")):
            cost = costs(geometry, compression, args.text_tokens)
            print(f"| {geometry.name} | {compression:.0%} | {cost['k']} of {geometry.visual_tokens} "
                  f"| {cost['default']:.1%} | {cost['keys-all']:.1%} | {cost['engine']:.1%} "
                  f"| {cost['kv_default_mib']:.0f} | {cost['kv_all_mib']:.0f} "
                  f"| {cost['skipped_kv_share']:.1%} | {cost['skipped_engine_share']:.1%} |")


if __name__ == "__main__":
    main()
