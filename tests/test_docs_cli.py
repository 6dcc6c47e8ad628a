"""docs/cli.md names every command and every option the command line has."""
import argparse
from pathlib import Path

import pytest

from ddim_fused.cli.commands import build_parser

CLI_DOC = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_is_documented():
    commands = _commands()
    assert {"sample", "generate"} <= set(commands)
    missing = [name for name in commands if f"`{name}`" not in CLI_DOC]
    assert not missing, f"docs/cli.md does not describe: {missing}"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_is_documented(command):
    parser = _commands()[command]
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert options, command
    missing = [o for o in options if f"`{o}`" not in CLI_DOC]
    assert not missing, f"docs/cli.md does not name these options of {command}: {missing}"
