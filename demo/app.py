"""The Gradio image chat of `adaspkv demo`: ask a (compressed) LLaVA about an image, answers streamed.

The page: an image and a question on the left with example images below; the chat on the right, or
two chats side by side (compressed and dense) when a dense server is configured and the box is
ticked; a panel with the artifact's profile (sparsity and KV bits per layer, KV capacity against a
16-bit cache) and the speed of the last answer. Failures (no image, a bad image, a server that is
gone) appear as a message above the chat, and the app keeps running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from demo.chat import AnswerStats, DemoError, Endpoint, build_messages, checked_image_url, stream_answer
from demo.plots import capacity_summary, kv_bits_figure, profile_markdown, sparsity_figure
from vllm_adaspkv.format import StrictModel, read_geometry, read_plan
from vllm_adaspkv.format.strict import AsTuple, LaxPath

STATUS_ID = "demo-status"  # elem_ids the browser test looks for
QUESTION_ID = "demo-question"
SEND_ID = "demo-send"
CHAT_ID = "demo-chat"
DENSE_CHAT_ID = "demo-dense-chat"
STATS_ID = "demo-stats"
IMAGE_ID = "demo-image"


class Example(StrictModel):
    image: LaxPath
    question: str


class AppConfig(StrictModel):
    compressed: Endpoint  # the server to chat with (compressed, or whatever it serves)
    dense: Endpoint | None = None  # the dense model, for side-by-side answers
    artifact: LaxPath | None = None  # shown in the profile panel
    max_tokens: Annotated[int, Field(ge=1)] = 32
    history_turns: Annotated[int, Field(ge=0)] = 0  # earlier question/answer pairs about the same image sent with a question
    examples: Annotated[tuple[Example, ...], AsTuple] = ()
    title: str = "adaspkv: image chat with a compressed LLaVA"

    @field_validator("examples")
    @classmethod
    def _images_exist(cls, examples: tuple[Example, ...]) -> tuple[Example, ...]:
        for example in examples:
            if not example.image.is_file():
                raise ValueError(f"example image {example.image}: no such file")
        return examples


def warning(message: str) -> str:
    return f"⚠️ {message}"


def chat_messages(turns: list[dict], key: str) -> list[dict]:
    """Chatbot messages from the turns: the image whenever it changes, each question, and the
    answer of `key` ("answer": the compressed model, "dense": the dense one)."""
    messages, shown = [], None
    for turn in turns:
        if turn["image"] != shown:
            messages.append({"role": "user", "content": {"path": turn["image"]}})
            shown = turn["image"]
        messages.append({"role": "user", "content": turn["question"]})
        if turn.get(key) is not None:
            messages.append({"role": "assistant", "content": turn[key] or "…"})
    return messages


def history_for(turns: list[dict], image: str, key: str, limit: int) -> list[tuple[str, str]]:
    """The last `limit` answered (question, answer) pairs about `image`."""
    if limit == 0:
        return []
    same = [(t["question"], t[key]) for t in turns if t["image"] == image and t.get(key)]
    return same[-limit:]


def stats_markdown(stats: dict[str, AnswerStats], number: int = 0) -> str:
    """The speed of answer `number` (counted from 1 in the chat), one line per model."""
    if not stats:
        return "Last answer: none yet."
    return "\n\n".join(f"Answer {number}, {label}: {s.describe()}." for label, s in stats.items())


class ChatHandler:
    """The app's one event: checks the inputs, then streams the answer of each model in turn.

    Yields (turns, status, stats) updates; Gradio-free, so that tests drive it directly.
    """

    def __init__(self, config: AppConfig):
        self.config = config

    def targets(self, compare: bool) -> list[tuple[str, Endpoint]]:
        pairs = [("answer", self.config.compressed)]
        if compare and self.config.dense is not None:
            pairs.append(("dense", self.config.dense))
        return pairs

    def __call__(self, image: str | None, question: str, turns: list[dict], compare: bool = False):
        turns = list(turns or [])
        try:
            url = checked_image_url(image)
            build_messages(url, question)  # checks the question
        except DemoError as exc:
            yield turns, warning(str(exc)), None
            return
        targets = self.targets(compare)
        turn = {"image": str(image), "question": question.strip(), **{key: None for key, _ in targets}}
        stats: dict[str, AnswerStats] = {}
        problems: list[str] = []
        for key, endpoint in targets:
            history = history_for(turns, turn["image"], key, self.config.history_turns)
            messages = build_messages(url, turn["question"], history)
            turn[key] = ""
            try:
                for item in stream_answer(endpoint, messages, self.config.max_tokens):
                    if isinstance(item, AnswerStats):
                        stats[endpoint.label] = item
                    else:
                        turn[key] = item
                        yield [*turns, dict(turn)], "", None
            except DemoError as exc:  # the server went away, or refused: keep what came, say why
                turn[key] = f"{turn[key]} (cut off)" if turn[key] else "(no answer)"
                problems.append(str(exc))
        status = "\n\n".join(warning(p) for p in problems)
        yield [*turns, dict(turn)], status, stats_markdown(stats, len(turns) + 1) if stats else None


def build_app(config: AppConfig):
    import gradio as gr

    handler = ChatHandler(config)
    with gr.Blocks(title=config.title, analytics_enabled=False) as app:
        gr.Markdown(f"# {config.title}\nUpload an image (or pick an example) and ask about it. "
                    f"Server: `{config.compressed.url}`.")
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", height=256, sources=["upload", "clipboard"],
                                 elem_id=IMAGE_ID)
                question = gr.Textbox(label="Question", placeholder="How many shapes are there?",
                                      elem_id=QUESTION_ID)
                compare = gr.Checkbox(label="Side by side: also ask the dense model", value=False,
                                      visible=config.dense is not None)
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id=SEND_ID)
                    clear = gr.Button("Clear chat")
                if config.examples:
                    gr.Examples([[str(e.image), e.question] for e in config.examples], inputs=[image, question],
                                label="Examples (ShapesVQA test images and photos)")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id=STATUS_ID)
                with gr.Row():
                    chat = gr.Chatbot(label=f"{config.compressed.label} model", elem_id=CHAT_ID, height=420)
                    dense_chat = gr.Chatbot(label="dense model", elem_id=DENSE_CHAT_ID, height=420,
                                            visible=False)
                stats = gr.Markdown(stats_markdown({}), elem_id=STATS_ID)
        with gr.Accordion("Compression profile", open=True):
            _profile_panel(gr, config.artifact)

        def ask(image_path, text, history, side_by_side):
            for new_turns, message, speed in handler(image_path, text, history, side_by_side):
                if message:
                    gr.Warning(message.replace("⚠️ ", ""))
                yield (new_turns, chat_messages(new_turns, "answer"), chat_messages(new_turns, "dense"),
                       message, gr.update() if speed is None else speed)

        outputs = [turns, chat, dense_chat, status, stats]
        for event in (send.click, question.submit):
            event(ask, [image, question, turns, compare], outputs)
        compare.change(lambda on: gr.update(visible=on), compare, dense_chat)
        clear.click(lambda: ([], [], [], "", stats_markdown({})), None, outputs)
    return app


def _profile_panel(gr, artifact: Path | None) -> None:
    if artifact is None:
        gr.Markdown("No artifact given (`--artifact`): no compression profile to show.")
        return
    try:
        plan = read_plan(artifact)
    except ValueError as exc:  # ArtifactError is a ValueError
        gr.Markdown(warning(f"The artifact's profile cannot be shown: {exc}"))
        return
    try:
        geometry = read_geometry(plan.base_model.path)
    except ValueError:  # ArtifactError: the base model is not on this machine, or not readable
        geometry = None
    gr.Markdown(profile_markdown(plan, artifact, geometry) + "\n\n" + capacity_summary(plan, geometry))
    with gr.Row():
        gr.Plot(sparsity_figure(plan, geometry), label="weight sparsity per layer")
        gr.Plot(kv_bits_figure(plan), label="KV bits per layer")


def launch(config: AppConfig, host: str, port: int, allowed_paths: tuple[Path, ...] = ()):
    """Starts the app in the background and returns (app, local URL); `app.close()` stops it."""
    from demo.chat import MAX_IMAGE_BYTES

    app = build_app(config)
    app.queue()
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
               max_file_size=MAX_IMAGE_BYTES, allowed_paths=[str(p) for p in allowed_paths])
    return app, app.local_url
