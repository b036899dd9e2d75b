"""The Data page: a dataset option's rows as the policy sees them."""

from __future__ import annotations

import shlex

from nicegui import run, ui

from gym_core.base.errors import GymError
from gym_core.ui import configs
from gym_core.ui.layout import (
    _pre,
    error_line,
    frame,
    tid,
)


@ui.page("/data")
def data_page() -> None:
    from gym_core.ui.data_view import view

    frame("Data")
    try:
        options = configs.groups()
        base = configs.compose([])
    except GymError as exc:
        error_line("data-error").text = str(exc)
        return
    with ui.row().classes("items-end w-full"):
        data = tid(ui.select(options["data"], value=base.choices["data"], label="data")
                   .classes("w-40"), "data-option")
        algo = tid(ui.select(options["algorithm"], value=base.choices["algorithm"],
                             label="algorithm").classes("w-40"), "data-algorithm")
        model = tid(ui.select(options["model"], value=base.choices["model"], label="model")
                    .classes("w-40"), "data-model")
        split = tid(ui.toggle(["train", "test"], value="train"), "data-split")
        start = tid(ui.number("first row", value=0, min=0, precision=0).classes("w-24"),
                    "data-start")
        count = tid(ui.select([4, 8, 16, 32], value=8, label="rows").classes("w-20"),
                    "data-count")
    extra = tid(ui.input("more overrides (e.g. data.train_file=my.jsonl, data.path=my.parquet "
                         "for data=hf, data.system_prompt='Answer briefly.')").classes("w-full"),
                "data-overrides")
    tid(ui.button("Show", on_click=lambda: show()), "data-show")
    message = error_line("data-error")
    info = tid(ui.label("Pick a dataset, a method and a model, then Show (the model's "
                        "tokenizer is loaded, not its weights).").classes("text-body2 q-my-sm"),
               "data-info")
    problem = tid(ui.label("").classes("text-warning text-body1"), "data-problem")
    problem.bind_visibility_from(problem, "text", backward=bool)
    rows_box = ui.column().classes("w-full")

    async def show() -> None:
        try:
            ovr = [f"data={data.value}", f"algorithm={algo.value}", f"model={model.value}",
                   *shlex.split(extra.value or "")]
        except ValueError as exc:
            message.text = f"more overrides: {exc}"
            return
        message.text = ""
        info.text = "loading the data and the tokenizer ..."
        try:
            result = await run.io_bound(view, ovr, split.value, int(start.value or 0),
                                        int(count.value))
        except GymError as exc:
            message.text, info.text = str(exc), ""
            rows_box.clear()
            return
        if result is None:
            return
        info.text = (f"data={result.data}: {result.total} {result.split} rows; showing "
                     f"{result.start}..{result.start + len(result.rows) - 1}, rendered for "
                     f"algorithm={result.algorithm} with {result.model}'s chat template. "
                     f"The method reads {result.reads}.")
        problem.text = result.problem or ""
        rows_box.clear()
        with rows_box:
            for k, row in enumerate(result.rows):
                with tid(ui.card().classes("w-full"), f"data-row-{k}"):
                    ui.label(f"row {row.index}").classes("text-subtitle2")
                    for seq in row.sequences:
                        cut = " (cut by the length limit)" if seq.cut else ""
                        ui.label(f"{seq.label}: {seq.tokens} tokens{cut}").classes(
                            "text-caption text-grey-8")
                        tid(ui.html("").classes("w-full"), f"data-seq-{k}-{seq.label.split()[0]}"
                            ).content = _pre(seq.text)
                    if row.target is not None:
                        tid(ui.label(f"answer (what the reward checks): {row.target}"),
                            f"data-answer-{k}")
                    with ui.expansion("the row as the data plugin gives it").classes("w-full"):
                        ui.code(row.source_json(), language="json").classes("w-full")
