"""The command line's own surface: --version, and help text that reads as plain text."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

import xception
from xception.cli import SUBCOMMANDS, build_parser, main


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"xception {xception.__version__}"
    assert importlib.metadata.version("xception") == xception.__version__


def test_help_is_plain_text():
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.dest == "command")
    texts += [p.format_help() for p in sub.choices.values()]
    assert len(texts) == len(SUBCOMMANDS) + 1
    for text in texts:
        assert not re.search(r"``|:(func|mod|class):`", text), text  # no reStructuredText markup
