"""`foldtron --help` and every subcommand's `--help` work and say something useful."""
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subcommands():
    parser = build_parser()
    for action in parser._subparsers._group_actions:
        return sorted(action.choices)
    return []


def test_top_level_help():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "curate" in out.stdout.lower() and "config" in out.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_subcommand_help(name):
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", name, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 3


def test_no_command_prints_help():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "usage: foldtron" in out.stdout
