"""The shipped artifacts (artifacts/) are what the commands in artifacts/README.md write: the selectors byte for
byte, the calibration up to floating-point rounding (the number of CPU threads changes the order of reductions)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from alvts_cli.app import app
from safetensors import safe_open
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


def _commands(verb: str) -> list[list[str]]:
    """The `alvts VERB ...` commands of artifacts/README.md, as argument lists (without `alvts`)."""
    lines = (ARTIFACTS / "README.md").read_text().splitlines()
    return [shlex.split(line.split("#")[0])[1:] for line in lines if line.strip().startswith(f"alvts {verb} ")]


def _reproduce(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """Run one command with its --out in `tmp_path` (inputs as shipped); (what it wrote, the shipped file)."""
    position = args.index("--out") + 1
    shipped = ROOT / args[position]
    written = tmp_path / shipped.name
    args = [*args[:position], str(written), *args[position + 1:]]
    args = [str(ROOT / arg) if arg.startswith("artifacts/") else arg for arg in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return written, shipped


def test_every_shipped_file_has_its_command():
    made = {Path(args[args.index("--out") + 1]).name for verb in ("calibrate", "export") for args in _commands(verb)}
    assert made == {path.name for path in ARTIFACTS.glob("*.safetensors")}


@pytest.mark.parametrize("args", _commands("export"), ids=lambda args: Path(args[-1]).stem)
def test_shipped_selectors_are_what_export_writes(args, tmp_path):
    written, shipped = _reproduce(args, tmp_path)
    assert written.read_bytes() == shipped.read_bytes()


def _assert_close_values(written, shipped, where: str = "metadata") -> None:
    """Equal JSON values, floats within rounding."""
    if isinstance(shipped, dict):
        assert isinstance(written, dict) and written.keys() == shipped.keys(), where
        for key in shipped:
            _assert_close_values(written[key], shipped[key], f"{where}.{key}")
    elif isinstance(shipped, list):
        assert isinstance(written, list) and len(written) == len(shipped), where
        for index, (a, b) in enumerate(zip(written, shipped, strict=True)):
            _assert_close_values(a, b, f"{where}[{index}]")
    elif isinstance(shipped, float):
        assert math.isclose(written, shipped, rel_tol=1e-4, abs_tol=1e-7), (where, written, shipped)
    else:
        assert written == shipped, (where, written, shipped)


@pytest.mark.slow
def test_the_shipped_calibration_is_what_calibrate_writes(tmp_path):
    (args,) = _commands("calibrate")
    written, shipped = _reproduce(args, tmp_path)
    with safe_open(written, "pt") as new, safe_open(shipped, "pt") as old:
        assert set(new.keys()) == set(old.keys())
        for key in old.keys():
            torch.testing.assert_close(new.get_tensor(key), old.get_tensor(key), rtol=1e-4, atol=1e-5, msg=key)
        new_meta, old_meta = new.metadata(), old.metadata()
    assert new_meta.keys() == old_meta.keys()
    for key in old_meta:
        _assert_close_values(json.loads(new_meta[key]), json.loads(old_meta[key]), key)
