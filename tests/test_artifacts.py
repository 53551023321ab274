"""The shipped artifacts (artifacts/) are byte for byte what the commands in artifacts/README.md write."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from alvts_cli.app import app
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


@pytest.mark.slow
def test_the_shipped_calibration_is_what_calibrate_writes(tmp_path):
    (args,) = _commands("calibrate")
    written, shipped = _reproduce(args, tmp_path)
    assert written.read_bytes() == shipped.read_bytes()
