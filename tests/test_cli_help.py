"""`alvts --help` and every subcommand's `--help`: they exit 0 and every option and argument is described."""

from __future__ import annotations

import re

import pytest
import typer
from alvts_cli.app import app
from typer.core import TyperCommand, TyperGroup
from typer.testing import CliRunner

runner = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
WIDE = {"COLUMNS": "300", "TERMINAL_WIDTH": "300"}  # no wrapping, so descriptions appear whole


def _flat(text: str) -> str:
    """Help output with the line breaks removed (also those after a hyphen, where help text wraps)."""
    return " ".join(re.sub(r"(?<=\w)-\n\s*", "-", text).split())


def _described(command: TyperCommand | TyperGroup) -> None:
    result = runner.invoke(app, [*([command.name] if command is not GROUP else []), "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    output = _flat(result.output)
    assert command.help and _flat(command.help).split(".")[0] in output
    for param in command.params:
        name = param.opts[0]
        assert param.help, f"{command.name} {name} has no help text"
        assert name in output and _flat(param.help) in output, f"{command.name} --help does not describe {name}"


def test_top_level_help_lists_every_command_with_a_summary():
    _described(GROUP)
    output = _flat(runner.invoke(app, ["--help"], env=WIDE).output)
    for name in COMMANDS:
        summary = GROUP.commands[name].help.split(".")[0]
        assert f"{name} {_flat(summary)}" in output


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_describes_every_option(name):
    _described(GROUP.commands[name])


def test_every_command_takes_json():
    for name, command in GROUP.commands.items():
        assert any("--json" in p.opts for p in command.params), f"{name} has no --json"


@pytest.mark.parametrize("columns", ["60", "80"])
def test_narrow_terminals_never_cut_option_names(columns):
    for name, command in GROUP.commands.items():
        output = runner.invoke(app, [name, "--help"], env={"COLUMNS": columns}).output
        assert "…" not in output and "..." not in output.replace("[ARGS]...", ""), name
        for param in command.params:
            assert param.opts[0] in output.split(), f"{name} --help cuts {param.opts[0]} at {columns} columns"
