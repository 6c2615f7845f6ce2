"""The `megafusion` dispatcher: every listed command exists and has a main()."""

import importlib

import pytest

from megafusion.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_suggests_closest(capsys):
    assert main(["trian"]) == 2
    assert "Did you mean 'train'?" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_module_has_main(name):
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        pytest.skip(f"`megafusion {name}` ({module_name}) is not built yet: {err}")
    assert callable(module.main)
