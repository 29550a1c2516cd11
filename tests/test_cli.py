"""The ``dormant`` command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from extract.cli import main

ZOO_NAMES = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "family", "variant", "quant", "download", "cached"]
    for name in ZOO_NAMES:
        assert any(line.startswith(name + " ") for line in lines), out
    assert "1093 MB" in out and "gemma3_text" in out


def test_help_and_list_do_not_import_torch():
    code = ("import sys; from extract.cli import main; main(['models', 'list']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "extract.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "models" in res.stdout


@pytest.mark.parametrize("argv", [["models", "info", "no-such-model"], ["models", "fetch", "no-such-model"]])
def test_unknown_name_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown") and err.count("\n") == 1
    assert all(name in err for name in ZOO_NAMES)


def test_fetch_needs_a_name(capsys):
    assert main(["models", "fetch"]) == 2
    assert "--all" in capsys.readouterr().err


@pytest.mark.slow
def test_models_info_json(capsys):
    assert main(["models", "info", "smollm2-135m-instruct"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 30 and info["n_heads"] == 9 and info["quantisation"] == "Q4_1"
    assert info["model"] == "smollm2-135m-instruct" and info["n_params"] > 100_000_000
