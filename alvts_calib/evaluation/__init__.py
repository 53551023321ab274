"""The evaluation harness and the reference methods (FastV, PyramidDrop, DART, oracle, random) it compares.

Not part of the product: nothing in model/, selector/, artifact/, runtime/ or calibration/ imports it.
"""

from .divergence import DivergenceResult, Reference, full_references, measure_plan, result_row
from .flops import (
    attention_flops,
    attention_on_all_layer_flops,
    decoder_flops,
    keys_all_layer_flops,
    layer_flops,
    projection_flops,
    skip_update_flops,
)
from .harness import (
    DEFAULT_COMPRESSIONS,
    DEFAULT_METHODS,
    METHODS,
    SELECTOR_METHODS,
    EvalReport,
    Harness,
    MethodResult,
    build_plans,
    check_methods,
    default_methods,
    evaluate,
    reference_visual_count,
)
from .plans import Plan, alvts_plan, fastv_plan, pyramid_plan

__all__ = [
    "DEFAULT_COMPRESSIONS", "DEFAULT_METHODS", "METHODS", "SELECTOR_METHODS", "DivergenceResult", "EvalReport",
    "Harness", "MethodResult", "Plan", "Reference", "alvts_plan", "attention_flops", "attention_on_all_layer_flops",
    "build_plans", "check_methods", "default_methods", "decoder_flops", "evaluate", "fastv_plan", "full_references",
    "keys_all_layer_flops", "layer_flops", "measure_plan", "projection_flops", "pyramid_plan",
    "reference_visual_count", "result_row", "skip_update_flops",
]
