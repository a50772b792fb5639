"""Run a script's command line inside the test process (faster than a subprocess)."""
import sys

from cli import run_cli


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


def assert_one_line_error(code, stderr: str, *words, stdout: str = "") -> str:
    """A command's refusal: exit code 2 and one line `error: ...` holding every word, no traceback."""
    assert code == 2, (code, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def collect_train_evaluate(monkeypatch, capsys, data_files, model_file, sets, run_dir):
    """collect.py, train.py and evaluate.py in turn, each asserted to exit 0; run_dir is the
    run train.py writes (evaluate.py reads it)."""
    import collect
    import evaluate
    import train
    data = [str(f) for f in data_files]
    for name, main, args in (("collect.py", collect.main, data), ("train.py", train.main, [*data, str(model_file)])):
        code, err = run_in_process(monkeypatch, capsys, name, main, [*args, "--set", *sets])
        assert code == 0, err
    code, err = run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main, [str(run_dir)])
    assert code == 0, err
