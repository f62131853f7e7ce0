import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from offline_search.openai_chat import image_data_url, image_message
from demo.cli import ASSETS, DemoConfig, _image_and_question
from demo.server import ServerConfig, ServerStartError, VllmServer, free_port
from vllm_adaspkv.cli import main


PHOTO = ASSETS / "images" / "waterview.jpg"


def _config(tmp_path, **overrides):
    fields = dict(model="shapes-llava", image=PHOTO, question="What is it?", workdir=tmp_path)
    return DemoConfig(**{**fields, **overrides})


def test_bundled_images_and_licence_note_exist():
    assert PHOTO.is_file() and (ASSETS / "images" / "extreme_ironing.jpg").is_file()
    assert "Apache-2.0" in (ASSETS / "README.md").read_text()


def test_default_question_is_a_shapesvqa_test_sample(tmp_path):
    image, question, expected = _image_and_question(_config(tmp_path, image=None, question=None, shapes_index=3))
    assert image.is_file() and image.suffix == ".png"
    assert question.endswith("?") and expected
    _, own_question, no_expectation = _image_and_question(_config(tmp_path, image=None, question="Why?"))
    assert (own_question, no_expectation) == ("Why?", None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": Path("missing.png")}, r"--image missing.png: no such file"),
        ({"question": None}, r"--image .*waterview.jpg needs a --question"),
        ({"shapes_index": -1}, r"--shapes-index -1: must be >= 0"),
        ({"question": "  "}, r"--question is empty"),
        ({"max_tokens": 0}, r"--max-tokens 0: must be >= 1"),
        ({"kv_cache_memory_bytes": 10}, r"--kv-cache-memory-bytes 10: must be >= 1 MiB"),
    ],
)
def test_demo_config_errors_name_the_option(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_demo_command_reports_bad_input_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"adaspkv demo: --image .*nope.jpg: no such file"):
        main(["demo", "--image", str(tmp_path / "nope.jpg"), "--question", "Q?", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"adaspkv demo: model '/nonexistent' is neither a bundled model"):
        main(["demo", "--model", "/nonexistent", "--workdir", str(tmp_path)])


def test_image_data_url_round_trips(tmp_path):
    path = tmp_path / "red.jpg"
    Image.new("RGB", (7, 5), (255, 0, 0)).save(path)
    url = image_data_url(path)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (7, 5)
    message = image_message("Which colour?", url)
    assert message["content"][0] == {"type": "image_url", "image_url": {"url": url}}


def test_image_data_url_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.jpg'"):
        image_data_url(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"port": 70000}, r"ServerConfig.port=70000 is not a TCP port"),
     ({"startup_timeout_s": 0}, r"ServerConfig.startup_timeout_s=0 must be > 0")],
)
def test_server_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(model="m", log_file=tmp_path / "log", **overrides)


def test_server_that_dies_at_start_up_reports_its_log(tmp_path, vllm_env):
    config = ServerConfig(model=str(tmp_path / "no-such-model"), log_file=tmp_path / "serve.log",
                          port=free_port(), env=vllm_env, startup_timeout_s=300)
    with pytest.raises(ServerStartError, match=r"(?s)`vllm serve` exited with code \d+ before it was ready.*serve.log"):
        VllmServer(config).start()
