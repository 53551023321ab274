"""`alvts doctor`: environment report from the CLI (tables and JSON) and its attention-backend verdicts."""

from __future__ import annotations

import json

import pytest
import torch
from alvts_cli.app import app
from typer.testing import CliRunner

from alvts_calib.model import doctor
from alvts_calib.model.adapters import SUPPORTED_FAMILIES
from alvts_calib.model.doctor import Gpu

runner = CliRunner()


def test_doctor_json_reports_versions_gpus_backends_and_families():
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"versions", "cuda_available", "cuda_version", "gpus", "attention_backends", "families"}
    versions = report["versions"]
    assert set(versions) >= {"python", "torch", "transformers", "safetensors", "datasets", "accelerate", "alvts-calib"}
    assert versions["torch"] == torch.__version__ and versions["alvts-calib"] is not None
    assert report["cuda_available"] == torch.cuda.is_available() and len(report["gpus"]) == torch.cuda.device_count()
    backends = {b["name"]: b for b in report["attention_backends"]}
    assert backends["eager"]["usable"] and backends["sdpa"]["usable"]
    assert "flash_attention_2" in backends and backends["flash_attention_2"]["reason"]
    assert report["families"] == list(SUPPORTED_FAMILIES)


def test_doctor_tables():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for text in ("transformers", "attention backends", "flash_attention_2", "qwen2_5_vl"):
        assert text in result.stdout


def _gpu(capability: str) -> Gpu:
    return Gpu(index=0, name="Test GPU", memory_gib=80.0, capability=capability, bf16=True)


@pytest.mark.parametrize(
    ("installed", "gpus", "usable", "reason"),
    [
        (False, [_gpu("9.0")], False, "not installed"),
        (True, [], False, "no CUDA GPU"),
        (True, [_gpu("7.5")], False, "compute capability 8.0"),
        (True, [_gpu("7.5"), _gpu("8.0")], True, "Test GPU"),
    ],
)
def test_flash_attention_verdict(monkeypatch, installed, gpus, usable, reason):
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: object() if installed else None)
    backend = doctor._flash_attention(gpus)
    assert backend.usable is usable and reason in backend.reason


def test_missing_package_has_no_version():
    assert doctor.package_version("surely-not-an-installed-distribution") is None
