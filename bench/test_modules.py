"""Every bench module imports and answers --help: a command-line tool no test runs can rot unseen."""
import importlib
from pathlib import Path

import pytest

MODULES = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                 if not p.stem.startswith(("test_", "_")) and p.stem != "conftest")


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_its_main_answers_help(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    main = getattr(module, "main", None)
    if main is None:
        return  # a library module: importing it was the check
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
