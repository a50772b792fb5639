"""Run a script's command line inside the test process (faster than a subprocess)."""
import sys

from utils import run_cli


def run_in_process(monkeypatch, capsys, script: str, main, argv) -> tuple[int, str]:
    """`script argv...` through run_cli(main): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *[str(a) for a in argv]])
    capsys.readouterr()
    code = 0
    try:
        run_cli(main)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
