from pathlib import Path

import pytest
from PIL import Image

from demo.app import AppConfig, ChatHandler, Example, build_app, chat_messages, history_for
from demo.chat import Endpoint
from tests.demo.conftest import FakeOpenAI


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "shapes.png"
    Image.new("RGB", (64, 64), (200, 220, 240)).save(path)
    return str(path)


def _run(handler, *args):
    return list(handler(*args))


def test_an_answer_streams_into_a_new_turn(fake_openai, image):
    handler = ChatHandler(AppConfig(compressed=Endpoint(fake_openai.url)))
    updates = _run(handler, image, " How many shapes? ", [], False)
    answers = [turns[-1]["answer"] for turns, _, _ in updates]
    assert answers == ["three", "three shapes", "three shapes here", "three shapes here"]
    turns, status, stats = updates[-1]
    assert turns == [{"image": image, "question": "How many shapes?", "answer": "three shapes here"}]
    assert status == "" and "Answer 1, compressed: 3 tokens in" in stats and "tokens/s" in stats
    assert all(s is None for _, _, s in updates[:-1])  # the speed panel changes once, at the end


@pytest.mark.parametrize(("picked", "question", "message"), [
    (None, "How many?", r"⚠️ Please upload an image first"),
    ("image", "  ", r"⚠️ Please type a question about the image"),
    ("corrupt", "How many?", r"⚠️ The file corrupt.png is not an image that can be read"),
])
def test_bad_input_is_a_message_and_no_request(fake_openai, image, tmp_path, picked, question, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    path = {"image": image, "corrupt": str(corrupt), None: None}[picked]
    earlier = [{"image": image, "question": "Q", "answer": "A"}]
    handler = ChatHandler(AppConfig(compressed=Endpoint(fake_openai.url)))
    [(turns, status, stats)] = _run(handler, path, question, earlier, False)
    assert turns == earlier and stats is None
    assert status.startswith(message.split(" ", 1)[0]) and __import__("re").search(message, status)
    assert fake_openai.requests == []


def test_a_server_that_is_gone_leaves_the_app_usable(fake_openai, dead_url, image):
    handler = ChatHandler(AppConfig(compressed=Endpoint(dead_url, model="m", timeout_s=5)))
    turns, status, _ = _run(handler, image, "How many?", [], False)[-1]
    assert f"⚠️ The vLLM server at {dead_url} is not answering" in status
    assert turns[-1]["answer"] == "(no answer)"
    # the same handler answers again once a server is there
    handler.config = AppConfig(compressed=Endpoint(fake_openai.url))
    turns, status, _ = _run(handler, image, "How many?", turns, False)[-1]
    assert status == "" and turns[-1]["answer"] == "three shapes here" and len(turns) == 2


def test_side_by_side_asks_both_models_and_reports_both_speeds(image):
    with FakeOpenAI("two", model="small") as compressed, FakeOpenAI("two shapes", model="big") as dense:
        config = AppConfig(compressed=Endpoint(compressed.url), dense=Endpoint(dense.url, label="dense"))
        turns, status, stats = _run(ChatHandler(config), image, "How many?", [], True)[-1]
        assert (turns[-1]["answer"], turns[-1]["dense"]) == ("two", "two shapes")
        assert "Answer 1, compressed: 1 token in" in stats and "Answer 1, dense: 2 tokens" in stats
        # unticked: the dense model is not asked
        turns, _, _ = _run(ChatHandler(config), image, "How many?", [], False)[-1]
        assert "dense" not in turns[-1] and len(dense.requests) == 1


def test_history_is_sent_only_when_asked_for(fake_openai, image, tmp_path):
    earlier = [{"image": image, "question": "Q1", "answer": "A1"},
               {"image": "other.png", "question": "Q2", "answer": "A2"}]
    _run(ChatHandler(AppConfig(compressed=Endpoint(fake_openai.url))), image, "Q3", earlier, False)
    _run(ChatHandler(AppConfig(compressed=Endpoint(fake_openai.url), history_turns=2)), image, "Q3", earlier, False)
    alone, with_history = (r["messages"] for r in fake_openai.requests)
    assert len(alone) == 1 and alone[0]["content"][1]["text"] == "Q3"
    # only the turn about the same image comes along, with the image in its first question
    assert [m["role"] for m in with_history] == ["user", "assistant", "user"]
    assert with_history[0]["content"][1]["text"] == "Q1" and with_history[2]["content"] == "Q3"


def test_chat_messages_show_each_image_once():
    turns = [{"image": "a.png", "question": "Q1", "answer": "A1", "dense": "D1"},
             {"image": "a.png", "question": "Q2", "answer": "", "dense": None},
             {"image": "b.png", "question": "Q3", "answer": "A3"}]
    assert chat_messages(turns, "answer") == [
        {"role": "user", "content": {"path": "a.png"}}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "…"},
        {"role": "user", "content": {"path": "b.png"}}, {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"}]
    assert [m["content"] for m in chat_messages(turns, "dense") if m["role"] == "assistant"] == ["D1"]
    assert history_for(turns, "a.png", "answer", 5) == [("Q1", "A1")]  # unanswered turns are left out
    assert history_for(turns, "a.png", "answer", 0) == []


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_tokens": 0}, r"^max_tokens = 0: must be greater than or equal to 1$"),
    ({"history_turns": -1}, r"^history_turns = -1: must be greater than or equal to 0$"),
    ({"examples": (Example(Path("nope.png"), "Q"),)}, r"example image nope.png: no such file"),
])
def test_app_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        AppConfig(compressed=Endpoint("http://127.0.0.1:1"), **overrides)


def test_app_builds_with_and_without_an_artifact(tmp_path, image):
    from offline_search.data.bundled_models import resolve_model
    from vllm_adaspkv.format import BaseCheckpoint, LayerPlan, Plan, write_artifact

    plan = Plan(base_model=BaseCheckpoint(path=str(resolve_model("shapes-llava")), sha256="0" * 64), metric="none",
                layers=tuple(LayerPlan(sparsity={}, kv_bits=b) for b in (8, 6, 6, 4)))
    artifact = write_artifact(tmp_path / "art", plan)
    broken = tmp_path / "broken"
    broken.mkdir()
    for art in (artifact, None, broken):
        config = AppConfig(compressed=Endpoint("http://127.0.0.1:1"), artifact=art,
                           dense=Endpoint("http://127.0.0.1:2", label="dense"), examples=(Example(Path(image), "Q?"),))
        app = build_app(config)
        text = str(app.config)
        assert "demo-chat" in text and "demo-status" in text
        if art is artifact:
            assert "KV cache capacity: 2.29x" in text  # 512 / (72 + 56 + 56 + 40) bytes per KV head
        elif art is None:
            assert "No artifact given (`--artifact`)" in text
        else:
            assert "cannot be shown" in text and "not an adaspkv artifact" in text
