"""Every command line of the project: ``--help`` works, every flag explains itself, every default is valid.

The values of the defaults that reproduce the release are checked where they matter (test_meta.py,
test_pre.py, test_proto_finetune.py); this file checks the form of every parser at once.
"""
from __future__ import annotations

import argparse
import importlib

import pytest

# command -> (module, function that parses an argv list)
COMMANDS = {
    "run_pre.py": ("run_pre", lambda m, argv: m.build_parser().parse_args(argv)),
    "run_fusion.py": ("run_fusion", lambda m, argv: m.parser.parse_args(argv)),
    "run_concatenation.py": ("run_concatenation", lambda m, argv: m.parser.parse_args(argv)),
    "run_proto.py": ("run_proto", lambda m, argv: m.parse_args(argv)),
    "run_demo.py": ("run_demo", lambda m, argv: m.parse_args(argv)),
    "python -m trainer.extract": ("trainer.extract", lambda m, argv: m.parse_args(argv)),
    "python -m trainer.report": ("trainer.report", lambda m, argv: m.build_parser().parse_args(argv)),
    "python -m dataloader.prepare": ("dataloader.prepare", lambda m, argv: m.parse_args(argv)),
    "python -m trainer.predict": ("trainer.predict", lambda m, argv: m.build_parser().parse_args(argv)),
    "python -m dataloader.demo": ("dataloader.demo", lambda m, argv: m.main(argv)),
    "python -m bench.meta": ("bench.meta", lambda m, argv: m.parse_args(argv)),
    "python -m bench.pretrain": ("bench.pretrain", lambda m, argv: m.parse_args(argv)),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_and_defaults(command, monkeypatch, capsys):
    module_name, parse = COMMANDS[command]
    module = importlib.import_module(module_name)
    parsers = []
    original = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: parsers.append(self) or original(self, file))
    with pytest.raises(SystemExit) as exit_:
        parse(module, ["--help"])
    assert exit_.value.code == 0 and len(parsers) == 1
    assert "usage:" in capsys.readouterr().out
    for action in parsers[0]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        if action.choices is not None and action.default is not None:
            defaults = action.default if isinstance(action.default, list) else [action.default]
            assert all(d in action.choices for d in defaults), f"{command} {name}: default outside its choices"
