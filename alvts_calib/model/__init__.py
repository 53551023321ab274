"""The model side: family adapters, visual positions, devices, fingerprints, loading and a layer's own attention.

Imports nothing from the rest of the package but `errors`, `options` and `progress`.
"""

from .adapters import SUPPORTED_FAMILIES, AttentionGeometry, FamilyAdapter, decoder_layers, get_adapter
from .doctor import Diagnosis, diagnose
from .fingerprint import check_fingerprint, model_fingerprint
from .loading import check_load_options, load_model, load_processor, max_positions, model_config
from .visual import visual_positions

__all__ = [
    "SUPPORTED_FAMILIES", "AttentionGeometry", "Diagnosis", "FamilyAdapter", "check_fingerprint", "check_load_options",
    "decoder_layers", "diagnose", "get_adapter", "load_model", "load_processor", "max_positions", "model_config",
    "model_fingerprint", "visual_positions",
]
