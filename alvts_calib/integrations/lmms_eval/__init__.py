"""lmms-eval plugin: lmms-eval's own transformers wrappers with an ALVTS selector attached after loading.

Installed with the `lmms-eval` extra. lmms-eval finds the models through the `lmms_eval.models` entry point, which
names `manifests`; it imports `models` (which imports lmms-eval) only when a run asks for one of them.
"""

from __future__ import annotations

from typing import Any

from .task import write_task

__all__ = ["manifests", "write_task"]

MODELS = {"alvts_llava_hf": "AlvtsLlavaHf", "alvts_qwen2_5_vl": "AlvtsQwen2_5_VL"}
# lmms-eval's llava_hf loads LLaVA-1.5 and LLaVA-NeXT alike, and so does alvts_llava_hf under either name.
ALIASES = {"alvts_llava_hf": ("alvts_llava_next",)}


def manifests() -> list[Any]:
    """The plugin's lmms-eval model manifests: the payload of the `lmms_eval.models` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=f"{__name__}.models.{cls}", aliases=ALIASES.get(name, ()))
        for name, cls in MODELS.items()
    ]

