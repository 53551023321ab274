"""`doctor`: what this environment can run (versions, GPUs, attention backends, model families)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import asdict, dataclass

import torch

from .adapters import SUPPORTED_FAMILIES

PACKAGES = ("torch", "transformers", "safetensors", "datasets", "accelerate", "alvts-calib")
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 needs Ampere or newer
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Gpu:
    """One visible CUDA device."""

    index: int
    name: str
    memory_gib: float
    capability: str
    bf16: bool


@dataclass(frozen=True)
class Backend:
    """An attention implementation and whether a model here can be loaded with it."""

    name: str
    usable: bool
    reason: str


@dataclass(frozen=True)
class Diagnosis:
    """Everything `alvts doctor` reports."""

    versions: dict[str, str | None]  # None: not installed
    cuda_available: bool
    cuda_version: str | None
    gpus: list[Gpu]
    attention_backends: list[Backend]
    families: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[Gpu]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        capability = (properties.major, properties.minor)
        gpus.append(Gpu(
            index=index, name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}", bf16=capability >= BF16_MIN_CAPABILITY,
        ))
    return gpus


def _flash_attention(gpus: list[Gpu]) -> Backend:
    name = "flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:
        return Backend(name, False, "the flash_attn package is not installed")
    if not gpus:
        return Backend(name, False, "no CUDA GPU is available")
    capable = [g for g in gpus if tuple(map(int, g.capability.split("."))) >= FLASH_MIN_CAPABILITY]
    if not capable:
        return Backend(name, False, "needs a GPU of compute capability 8.0 or newer (Ampere+)")
    return Backend(name, True, f"flash_attn {package_version('flash-attn') or 'installed'} on {capable[0].name}")


def attention_backend(name: str) -> Backend:
    """Whether the attention implementation `name` can run here, and why (not)."""
    if name == "flash_attention_2":
        return _flash_attention(_gpus())
    return Backend(name, True, "always available" if name == "eager" else f"torch {torch.__version__}")


def diagnose() -> Diagnosis:
    """Inspect the running environment; never raises for a missing optional package or GPU."""
    gpus = _gpus()
    versions = {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES}}
    backends = [
        Backend("eager", True, "always available"),
        Backend("sdpa", True, f"torch {torch.__version__} scaled_dot_product_attention"),
        _flash_attention(gpus),
    ]
    return Diagnosis(
        versions=versions, cuda_available=bool(gpus), cuda_version=torch.version.cuda, gpus=gpus,
        attention_backends=backends, families=list(SUPPORTED_FAMILIES),
    )
