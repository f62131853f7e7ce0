"""`--plugin` on vLLM's command line: accepted, validated, carried to the engine config.

vLLM is patched by register(), so each check runs in a fresh process.
"""

import argparse
import json
import subprocess
import sys

import pytest

from tests.conftest import ENGINE_SCRIPTS, venv_bin
from vllm_adaspkv.engine.plugin_flag import add_plugin_argument, plugin_name
from vllm_adaspkv.engine.settings import enabled_in


def test_plugin_name_accepts_known_and_names_the_unknown():
    assert plugin_name("adaspkv") == "adaspkv"
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown plugin 'nope'; known plugins: adaspkv"):
        plugin_name("nope")


def test_add_plugin_argument_once_per_parser():
    parser = argparse.ArgumentParser()
    add_plugin_argument(parser)
    add_plugin_argument(parser)
    assert parser.parse_args(["--plugin", "adaspkv"]).plugin == "adaspkv"
    assert parser.parse_args([]).plugin is None


def test_enabled_in():
    assert enabled_in({"adaspkv": {"enabled": True}})
    assert not enabled_in({"other": 1})
    assert not enabled_in(None)


def _parse(tmp_path, model_dir, *args, env):
    result = tmp_path / "parsed.json"
    out = subprocess.run([sys.executable, str(ENGINE_SCRIPTS / "parse_plugin_flag.py"),
                          str(result), str(model_dir), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(result.read_text())


def test_register_is_idempotent_and_carries_the_flag_to_engine_args(tmp_path, tiny_llava_dir, vllm_env):
    on = _parse(tmp_path, tiny_llava_dir, "--plugin", "adaspkv", env=vllm_env)
    assert on["plugin"] == "adaspkv"
    assert on["additional_config"] == {"adaspkv": {"enabled": True}}
    assert on["wrapper_unchanged_by_second_register"]
    assert on["plugin_options_in_parser"] == 1

    off = _parse(tmp_path, tiny_llava_dir, env=vllm_env)
    assert off["plugin"] is None
    assert off["additional_config"] == {}


def test_vllm_serve_help_lists_plugin(vllm_env):
    out = subprocess.run([venv_bin("vllm"), "serve", "--help=all"], capture_output=True,
                         text=True, env=vllm_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--plugin NAME" in out.stdout
    assert "Known: adaspkv" in out.stdout


def test_vllm_serve_rejects_unknown_plugin(tiny_llava_dir, vllm_env):
    out = subprocess.run([venv_bin("vllm"), "serve", str(tiny_llava_dir), "--plugin", "nope"],
                         capture_output=True, text=True, env=vllm_env, timeout=300)
    assert out.returncode != 0
    assert "argument --plugin: unknown plugin 'nope'; known plugins: adaspkv" in out.stderr
