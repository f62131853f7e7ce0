"""The `vllm serve` launcher: its configuration and a server that dies at start-up."""

import pytest

from offline_search.evaluation.vllm_server import ServerConfig, ServerStartError, VllmServer, free_port


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"port": 70000}, r"^port = 70000: must be less than 65536$"),
     ({"startup_timeout_s": 0}, r"^startup_timeout_s = 0: must be greater than 0$")],
)
def test_server_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(model="m", log_file=tmp_path / "log", **overrides)


def test_server_that_dies_at_start_up_reports_its_log(tmp_path, vllm_env):
    config = ServerConfig(model=str(tmp_path / "no-such-model"), log_file=tmp_path / "serve.log",
                          port=free_port(), env=vllm_env, startup_timeout_s=300)
    with pytest.raises(ServerStartError, match=r"(?s)`vllm serve` exited with code \d+ before it was ready.*serve.log"):
        VllmServer(config).start()
