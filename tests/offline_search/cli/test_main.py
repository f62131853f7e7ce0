import subprocess

import pytest

from offline_search.cli.main import build_parser, main
from tests.conftest import venv_bin
from vllm_adaspkv import __version__


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: adaspkv" in out
    assert "demo" in out


def test_version_of_the_installed_console_script():
    out = subprocess.run([venv_bin("adaspkv"), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"adaspkv {__version__}"


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    from vllm_adaspkv.errors import ConfigError

    args = ["prune", "--model", "shapes-llava", "--sparsity", "0.5", "--out", str(tmp_path / "art")]

    def bad_input(config):
        raise ConfigError("sparsity = 2: must be less than 1")

    monkeypatch.setattr("offline_search.search.compress.compress", bad_input)
    with pytest.raises(SystemExit, match=r"^adaspkv prune: error: sparsity = 2: must be less than 1$"):
        main(args)
    with pytest.raises(ConfigError, match="must be less than 1"):  # --debug: the traceback too
        main(["--debug", *args])

    def bug(config):
        raise ValueError("Expected all tensors to be on the same device")  # torch's, not ours

    monkeypatch.setattr("offline_search.search.compress.compress", bug)
    with pytest.raises(ValueError, match="same device"):
        main(args)
