"""The Playground: chat with a served base model and its variants side by side."""

from __future__ import annotations

import asyncio

from nicegui import ui

from gym_core.ui.client import ServeClient, ServeError
from gym_core.ui.layout import (
    error_line,
    frame,
    settings,
    tid,
)


@ui.page("/playground")
def playground_page(models: str | None = None) -> None:
    """``?models=a,b`` opens with those models side by side."""
    frame("Playground")
    with ui.row().classes("items-end w-full"):
        url = tid(ui.input("server", value=settings.serve_url).classes("w-80"), "play-url")
        tid(ui.button("Connect", on_click=lambda: connect()), "play-connect")
        chosen = tid(ui.select([], multiple=True, label="models side by side").classes(
            "min-w-[300px]"), "play-models")
    with ui.row().classes("items-end w-full"):
        system = tid(ui.input("system prompt (empty: the chat template's default)").classes(
            "w-96"), "play-system")
        temperature = tid(ui.number("temperature", value=0.0, min=0, max=2, step=0.1).classes(
            "w-28"), "play-temperature")
        max_tokens = tid(ui.number("max tokens", value=64, min=1, precision=0).classes("w-28"),
                         "play-max-tokens")
        seed = tid(ui.input("seed").classes("w-20"), "play-seed")
        tid(ui.button("Clear", on_click=lambda: clear()).props("flat"), "play-clear")
    message = error_line("play-error")
    columns_box = ui.row().classes("w-full no-wrap items-start gap-4")
    with ui.row().classes("w-full items-end"):
        prompt = tid(ui.textarea("message").props("autogrow").classes("flex-grow"), "play-prompt")
        send_btn = tid(ui.button("Send", on_click=lambda: send()), "play-send")
    histories: dict[str, list[dict[str, str]]] = {}
    boxes: dict[str, ui.column] = {}
    turn = {"n": 0}

    def client() -> ServeClient:
        return ServeClient(url.value.strip(), settings.api_key)

    async def connect() -> None:
        try:
            served = await client().models()
        except ServeError as exc:
            message.text = str(exc)
            return
        message.text = ""
        chosen.options = served
        asked = [m for m in (models or "").split(",") if m]
        missing = [m for m in asked if m not in served]
        if missing:
            message.text = f"not served by {url.value}: {', '.join(missing)}"
        chosen.value = [m for m in (asked or chosen.value or []) if m in served] or served[:2]
        chosen.update()

    def layout() -> None:
        for m in list(boxes):
            if m not in (chosen.value or []):
                del boxes[m]
        columns_box.clear()
        with columns_box:
            for m in chosen.value or []:
                with ui.card().classes("flex-1 min-w-0"):
                    ui.label(m).classes("text-subtitle1 text-weight-bold")
                    box = ui.column().classes("w-full")
                    boxes[m] = box
                    with box:
                        for i, msg in enumerate(histories.get(m, [])):
                            _bubble(m, msg["role"], msg["content"], i // 2 + 1)

    chosen.on_value_change(lambda _: layout())

    def clear() -> None:
        histories.clear()
        turn["n"] = 0
        layout()

    async def answer(model: str, text: str, n: int) -> None:
        history = histories.setdefault(model, [])
        history.append({"role": "user", "content": text})
        with boxes[model]:
            _bubble(model, "user", text, n)
            label = _bubble(model, "assistant", "", n)
        messages = ([{"role": "system", "content": system.value}] if system.value else []) \
            + history
        params = {"temperature": float(temperature.value or 0.0),
                  "max_tokens": int(max_tokens.value or 64)}
        if (seed.value or "").strip():
            params["seed"] = int(seed.value)
        pieces = []
        try:
            async for piece in client().stream_chat(model, messages, **params):
                pieces.append(piece)
                label.text = "".join(pieces)
        except ServeError as exc:
            history.pop()  # the turn did not happen: it is not sent again
            label.text = f"error: {exc}"
            label.classes("text-negative")
            message.text = f"{model}: {exc}"
            return
        history.append({"role": "assistant", "content": "".join(pieces)})
        tid(label, f"answer-{model}-{n}-done")

    async def send() -> None:
        text = prompt.value or ""
        if not text.strip():
            message.text = "type a message first"
            return
        models = list(chosen.value or [])
        if not models:
            message.text = "connect to a server and pick at least one model"
            return
        if seed.value and not seed.value.strip().lstrip("-").isdigit():
            message.text = f"seed: {seed.value!r} is not an integer"
            return
        message.text = ""
        if set(models) != set(boxes):
            layout()
        turn["n"] += 1
        prompt.value = ""
        send_btn.disable()
        try:
            await asyncio.gather(*(answer(m, text, turn["n"]) for m in models))
        finally:
            send_btn.enable()

    ui.timer(0.1, connect, once=True)


def _bubble(model: str, role: str, text: str, n: int):
    """A chat message; returns the label holding its text (updated while streaming)."""
    with ui.chat_message(name="you" if role == "user" else model, sent=role == "user"):
        label = ui.label(text).style("white-space: pre-wrap")
    return tid(label, f"{'question' if role == 'user' else 'answer'}-{model}-{n}")
