import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from demo.launch import (
    ASSETS,
    DemoConfig,
    SearchFailed,
    check_port,
    default_artifact_dir,
    ensure_artifact,
    image_and_question,
    resolve_artifact,
    search_command,
    serve_args,
    serving,
    shapes_examples,
    stop_signals,
)
from offline_search.cli.main import main
from offline_search.data.bundled_models import resolve_model
from vllm_adaspkv.format import ArtifactError, BaseCheckpoint, LayerPlan, Plan, write_artifact

PHOTO = ASSETS / "images" / "waterview.jpg"
SHAPES_LLAVA = resolve_model("shapes-llava")


def _once(tmp_path, **overrides):
    fields = dict(once=True, image=PHOTO, question="What is it?", workdir=tmp_path)
    return DemoConfig(**{**fields, **overrides})


def _artifact(path: Path, base: Path) -> Path:
    plan = Plan(base_model=BaseCheckpoint(path=str(base), sha256="0" * 64), metric="none",
                layers=tuple(LayerPlan(sparsity={}, kv_bits=8) for _ in range(4)))
    return write_artifact(path, plan)


def test_bundled_images_and_licence_note_exist():
    assert PHOTO.is_file() and (ASSETS / "images" / "extreme_ironing.jpg").is_file()
    assert "Apache-2.0" in (ASSETS / "README.md").read_text()


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--artifact", "--server-url", "--compare-dense", "--dense-server-url", "--port",
                   "--once", "--search-trials", "--history-turns", "vllm serve ART_DIR --plugin adaspkv"):
        assert option in out


def test_once_default_question_is_a_shapesvqa_test_sample(tmp_path):
    image, question, expected = image_and_question(_once(tmp_path, image=None, question=None, shapes_index=3))
    assert image.is_file() and image.suffix == ".png"
    assert question.endswith("?") and expected
    _, own_question, no_expectation = image_and_question(_once(tmp_path, image=None, question="Why?"))
    assert (own_question, no_expectation) == ("Why?", None)


def test_examples_are_shapesvqa_samples_then_photos(tmp_path):
    examples = shapes_examples(tmp_path)
    assert examples[0].question == "How many shapes are there?"
    assert examples[0].image.parent == (tmp_path / "examples").resolve()
    assert all(e.image.is_file() for e in examples) and examples[-1].image.suffix == ".jpg"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": Path("missing.png")}, r"--image missing.png: no such file"),
        ({"question": None}, r"--image .*waterview.jpg needs a --question"),
        ({"shapes_index": -1}, r"^shapes_index = -1: must be greater than or equal to 0$"),
        ({"question": "  "}, r"--question is empty"),
        ({"max_tokens": 0}, r"^max_tokens = 0: must be greater than or equal to 1$"),
        ({"search_trials": 0}, r"^search_trials = 0: must be greater than or equal to 1$"),
        ({"history_turns": -2}, r"^history_turns = -2: must be greater than or equal to 0$"),
        ({"kv_cache_memory_bytes": 10}, r"^kv_cache_memory_bytes = 10: must be greater than or equal to 1048576$"),
        ({"once": False}, r"--image and --question go with --once"),
        ({"server_url": "localhost:8000"}, r"^server_url = 'localhost:8000': give a URL such as http://127.0.0.1:8000$"),
        ({"dense_server_url": "http://h:1"}, r"--dense-server-url goes with --compare-dense"),
        ({"port": 70000}, r"^port = 70000: must be less than 65536$"),
        ({"artifact": "/nonexistent"}, r"--artifact /nonexistent: not an artifact directory \(no adaspkv.json\)"),
    ],
)
def test_demo_config_errors_name_the_option(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _once(tmp_path, **overrides)


def test_demo_command_reports_bad_input_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"adaspkv demo: error: --image .*nope.jpg: no such file"):
        main(["demo", "--once", "--image", str(tmp_path / "nope.jpg"), "--question", "Q?", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"adaspkv demo: error: model '/nonexistent' is neither a bundled model"):
        main(["demo", "--model", "/nonexistent", "--workdir", str(tmp_path)])


def test_a_port_in_use_is_reported_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert check_port("127.0.0.1", 0) not in (0, port)
        with pytest.raises(SystemExit, match=rf"adaspkv demo: error: --port {port}: cannot listen on 127.0.0.1:{port}"):
            main(["demo", "--port", str(port), "--model", "/nonexistent", "--workdir", str(tmp_path)])


def test_default_artifact_is_searched_once_per_model(tmp_path):
    out = default_artifact_dir(tmp_path, "shapes-llava")
    assert out == tmp_path / "artifacts" / "shapes-llava"
    assert default_artifact_dir(tmp_path, str(tmp_path / "my-llava/")) == tmp_path / "artifacts" / "my-llava"
    command = search_command("shapes-llava", SHAPES_LLAVA, out, 3)
    assert command[:3] == [sys.executable, "-m", "offline_search.cli.main"]
    assert command[3:] == ["search", "--model", "shapes-llava", "--sparsity", "0.3", "--kv-bits-budget", "6",
                           "--trials", "3", "--seq-len", "256", "--out", str(out)]  # its whole context


def test_the_first_runs_search_caps_long_contexts(tmp_path):
    import json

    model = tmp_path / "long-context"
    model.mkdir()
    config = json.loads((SHAPES_LLAVA / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 8192  # smol-llava's
    (model / "config.json").write_text(json.dumps(config))
    command = search_command(str(model), model, tmp_path / "art", 3)
    assert command[command.index("--seq-len") + 1] == "512"


def test_an_existing_artifact_is_reused_and_a_foreign_one_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("demo.launch.search_command", lambda *a: pytest.fail("searched again"))
    art = _artifact(tmp_path / "art", SHAPES_LLAVA)
    assert ensure_artifact("shapes-llava", SHAPES_LLAVA, art, 3) == art
    with pytest.raises(ArtifactError, match=r"art was made from .*shapes-llava, not /other; delete it or pass"):
        ensure_artifact("other", Path("/other"), art, 3)


def test_a_failed_search_shows_its_log(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; print('calibration exploded'); sys.exit(3)"]
    monkeypatch.setattr("demo.launch.search_command", lambda *a: failing)
    message = r"(?s)failed \(exit code 3\); last lines of .*art-search.log:\ncalibration exploded"
    with pytest.raises(SearchFailed, match=message):
        ensure_artifact("shapes-llava", SHAPES_LLAVA, tmp_path / "art", 3)


def test_artifact_choice(tmp_path):
    assert resolve_artifact(DemoConfig(artifact="none", workdir=tmp_path), SHAPES_LLAVA) is None
    # somebody else's server: no search for a profile nobody asked for
    assert resolve_artifact(DemoConfig(server_url="http://h:1", workdir=tmp_path), SHAPES_LLAVA) is None
    art = _artifact(tmp_path / "art", SHAPES_LLAVA)
    assert resolve_artifact(DemoConfig(artifact=str(art), workdir=tmp_path), SHAPES_LLAVA) == art


def test_serve_args(tmp_path, small_family_dir):
    config = DemoConfig(workdir=tmp_path, kv_cache_memory_bytes=64 << 20)
    # the dtype the checkpoint is stored in: vLLM's "auto" would serve float32 weights in 16 bits
    assert serve_args(config, SHAPES_LLAVA, plugin=True) == (
        "--plugin", "adaspkv", "--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20))
    assert serve_args(config, small_family_dir, plugin=False)[:2] == ("--dtype", "bfloat16")
    assert serve_args(DemoConfig(workdir=tmp_path, dtype="bfloat16"), SHAPES_LLAVA, False)[1] == "bfloat16"


def test_running_servers_are_used_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr("demo.launch.start_server", lambda *a: pytest.fail("started a server"))
    art = _artifact(tmp_path / "art", SHAPES_LLAVA)
    config = DemoConfig(server_url="http://h:1/", compare_dense=True, dense_server_url="http://h:2",
                        artifact=str(art), workdir=tmp_path)
    with serving(config, SHAPES_LLAVA, art) as (main_endpoint, dense):
        assert (main_endpoint.url, main_endpoint.model, main_endpoint.label) == ("http://h:1", None, "compressed")
        assert (dense.url, dense.label) == ("http://h:2", "dense")


def test_sigterm_and_ctrl_c_end_the_demo_through_its_clean_up():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    cleaned = []
    with pytest.raises(SystemExit) as exit_info, stop_signals(), ExitStack() as stack:
        stack.callback(cleaned.append, "servers stopped")
        os.kill(os.getpid(), signal.SIGTERM)
    assert exit_info.value.code == 128 + signal.SIGTERM and cleaned == ["servers stopped"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    with pytest.raises(KeyboardInterrupt), stop_signals(), ExitStack() as stack:
        stack.callback(cleaned.append, "servers stopped again")
        os.kill(os.getpid(), signal.SIGINT)
    assert cleaned == ["servers stopped", "servers stopped again"]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, before[signal.SIGINT])
    assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]


def test_an_artifact_whose_base_model_moved_is_pointed_at_it_or_searched_again(tmp_path, monkeypatch,
                                                                                tiny_llava_dir):
    import json
    import shutil

    from vllm_adaspkv.format import PLAN_FILE, base_model_dir, model_sha256, read_plan

    base = tmp_path / "installed" / "shapes-llava"
    shutil.copytree(SHAPES_LLAVA, base)
    art = write_artifact(tmp_path / "art", Plan(base_model=BaseCheckpoint(path=str(base), sha256=model_sha256(base)),
                                                metric="none", layers=(LayerPlan(sparsity={}, kv_bits=8),) * 4))
    shutil.move(tmp_path / "installed", tmp_path / "reinstalled")  # an older release's path is gone
    monkeypatch.setattr("demo.launch.search_command", lambda *a: pytest.fail("searched again"))
    assert ensure_artifact("shapes-llava", tmp_path / "reinstalled" / "shapes-llava", art, 3) == art
    assert base_model_dir(read_plan(art), art).resolve() == (tmp_path / "reinstalled" / "shapes-llava").resolve()
    # gone, and not the same model: the demo's own artifact is searched again
    data = json.loads((art / PLAN_FILE).read_text())
    data["base_model"]["path"] = str(tmp_path / "nowhere")
    (art / PLAN_FILE).write_text(json.dumps(data))
    searched = [sys.executable, "-c", "import sys; sys.exit(4)"]
    monkeypatch.setattr("demo.launch.search_command", lambda *a: searched)
    with pytest.raises(SearchFailed, match=r"exit code 4"):
        ensure_artifact("shapes-llava", tiny_llava_dir, art, 3)
