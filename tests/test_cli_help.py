"""``teal --help``: every command listed, each with its one-line help."""

from __future__ import annotations

import pytest

import teal.cli


def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal still gets one line each
    with pytest.raises(SystemExit) as exc:
        teal.cli.main(["--help"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name in teal.cli.COMMANDS:
        (line,) = [ln for ln in lines if ln.strip().split(" ")[0] == name]
        help_text = line.strip()[len(name) :].strip()
        assert len(help_text) > 10, line  # the command and its help on the same line
    assert len(teal.cli.COMMANDS) == 7


def test_unknown_arguments_are_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        teal.cli.main(["report", "x", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
