"""Chat requests with an image, as the harness and the demo send them."""

import base64
import io

import pytest
from PIL import Image

from offline_search.evaluation.openai_chat import image_data_url, image_message


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
