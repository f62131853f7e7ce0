import base64
import io

import pytest
from PIL import Image

from demo.chat import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    AnswerStats,
    DemoError,
    Endpoint,
    build_messages,
    checked_image_url,
    served_model,
    stream_answer,
)
from tests.demo.conftest import FakeOpenAI


@pytest.fixture
def red_png(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (7, 5), (255, 0, 0)).save(path)
    return path


def test_checked_image_url_keeps_the_pixels(red_png):
    url = checked_image_url(red_png)
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert url.startswith("data:image/png;base64,") and decoded.size == (7, 5)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_no_image_asks_for_one():
    for missing in (None, ""):
        with pytest.raises(DemoError, match=r"Please upload an image first"):
            checked_image_url(missing)


def test_a_vanished_file_is_reported(tmp_path):
    with pytest.raises(DemoError, match=r"The image gone.png is gone; please upload it again"):
        checked_image_url(tmp_path / "gone.png")


def test_oversized_file_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:  # sparse: the size counts, the content is never read
        f.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(DemoError, match=r"The image is 10.0 MB; the demo takes images up to 10 MB"):
        checked_image_url(path)


def test_too_many_pixels_are_refused(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (MAX_IMAGE_SIDE + 1, 2)).save(path)  # a few kB, but too wide
    message = rf"The image is {MAX_IMAGE_SIDE + 1}x2 pixels; .* up to {MAX_IMAGE_SIDE} pixels"
    with pytest.raises(DemoError, match=message):
        checked_image_url(path)


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_corrupt_file_is_refused(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(DemoError, match=r"The file broken.jpg is not an image that can be read"):
        checked_image_url(path)


def test_truncated_image_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header is intact, the pixels are not
    with pytest.raises(DemoError, match=r"The file cut.jpg is not an image that can be read"):
        checked_image_url(path)


def test_messages_put_the_image_with_the_first_question():
    alone = build_messages("data:URL", " How many? ")
    assert alone == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:URL"}},
                                                   {"type": "text", "text": "How many?"}]}]
    chat = build_messages("data:URL", "And now?", [("Q1", "A1"), ("Q2", "A2")])
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    assert chat[0]["content"][1]["text"] == "Q1" and chat[2:] == [
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "And now?"}]
    with pytest.raises(DemoError, match=r"Please type a question"):
        build_messages("data:URL", "   ")


def test_endpoint_normalises_the_url_and_checks_it():
    assert Endpoint("http://h:1/v1/").url == "http://h:1"
    with pytest.raises(ValueError, match=r"^url = 'h:1': give a URL such as http://127.0.0.1:8000$"):
        Endpoint("h:1")


def test_stream_yields_growing_text_then_stats(fake_openai, red_png):
    items = list(stream_answer(Endpoint(fake_openai.url), build_messages(checked_image_url(red_png), "Q?"), 16))
    texts, stats = items[:-1], items[-1]
    assert texts == ["three", "three shapes", "three shapes here"]
    assert isinstance(stats, AnswerStats) and stats.tokens == 3  # the server's usage count
    assert 0 < stats.first_token_s <= stats.seconds and stats.tokens_per_s == pytest.approx(3 / stats.seconds)
    assert "3 tokens in" in stats.describe() and "tokens/s" in stats.describe()
    request = fake_openai.requests[0]
    assert request["model"] == "fake-llava"  # the first model the server lists
    assert request["stream"] is True and request["temperature"] == 0.0 and request["max_tokens"] == 16


def test_a_server_that_is_gone_is_named(dead_url):
    endpoint = Endpoint(dead_url, model="m", timeout_s=5)
    with pytest.raises(DemoError, match=rf"The vLLM server at {dead_url} is not answering"):
        list(stream_answer(endpoint, build_messages("data:URL", "Q?"), 4))
    with pytest.raises(DemoError, match=rf"The vLLM server at {dead_url} is not answering"):
        served_model(Endpoint(dead_url, timeout_s=5))


def test_a_refused_request_shows_the_server_message(red_png):
    with FakeOpenAI(status=400) as fake:
        with pytest.raises(DemoError, match=r"refused the request \(400\): .*maximum context length"):
            list(stream_answer(Endpoint(fake.url, model="m"), build_messages("data:URL", "Q?"), 4))
