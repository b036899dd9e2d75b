"""``gym``: one command for gym's programs (the console script of ``pip install``).

    gym train [overrides]        python -m gym_core            (Hydra overrides, -m sweeps)
    gym eval ...                 python -m gym_core.eval
    gym export run=runs/<name>   python -m gym_core.export
    gym serve --base tiny ...    python -m gym_core.serve
    gym ui                       python -m gym_core.ui
    gym soup soup=<rule> ...     python -m gym_core.soup
    gym plugins                  python -m gym_core --plugins

Each command runs its program's module as ``python -m`` would (same arguments, output and
exit status), so both forms stay the same program. ``gym --help`` and ``gym <command>
--help`` import no torch; the module a command names is imported only when it runs.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # run as `python -m <module>`
    summary: str
    args: tuple[str, ...] = ()  # put before the user's arguments
    needs: str = ""  # what to install when the module is absent


COMMANDS: dict[str, Command] = {
    "train": Command("gym_core", "train one run or a sweep (-m): Hydra overrides, e.g. "
                                 "algorithm=grpo quant=bitdelta"),
    "eval": Command("gym_core.eval", "evaluate a model or a run on a benchmark",
                    needs="a gym-core release that ships gym_core/eval/__main__.py"),
    "export": Command("gym_core.export", "turn a run into files other tools load "
                                         "(run=runs/<name> format=hf|gguf|lora|delta)"),
    "serve": Command("gym_core.serve", "serve a base model and its variants over an "
                                       "OpenAI-compatible API",
                     needs="gym's serve extra: pip install 'gym-core[serve]'"),
    "ui": Command("gym_core.ui", "the web UI: start, watch and compare runs",
                  needs="gym's ui extra: pip install 'gym-core[ui]'"),
    "soup": Command("gym_core.soup", "merge several runs' deltas (DeltaSoup: soup=<rule> "
                                     "soup.inputs=[a,b,c])"),
    "plugins": Command("gym_core", "list the installed plugins and what they add",
                       args=("--plugins",)),
}

USAGE = "usage: gym <command> [arguments]   (gym <command> --help: that command's options)"


def help_text() -> str:
    from gym_core import __version__

    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return (f"gym {__version__}: post-training for language models, one plugin per method.\n"
            f"{USAGE}\n\ncommands:\n{rows}\n\n"
            "examples:\n"
            "  gym train algorithm=grpo quant=bitdelta\n"
            "  gym train model=tiny trainer.max_steps=2 run.name=smoke\n"
            "  gym train +recipe=sft_then_grpo          # recipes: conf/recipe/, docs/guide.md\n"
            "  gym export run=runs/smoke format=gguf\n"
            "  gym serve --base tiny --variants runs/\n"
            "Each command is also `python -m <module>` (gym train: python -m gym_core).")


def _error(message: str) -> int:
    print(f"gym: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(help_text(), file=sys.stderr)
        return 2
    first = args[0]
    if first in ("-h", "--help", "help"):
        if first == "help" and len(args) > 1:  # gym help train == gym train --help
            return main([args[1], "--help"])
        print(help_text())
        return 0
    if first in ("-V", "--version"):
        from gym_core import __version__

        print(f"gym-core {__version__}")
        return 0
    command = COMMANDS.get(first)
    if command is None:
        import difflib

        close = difflib.get_close_matches(first, COMMANDS, n=1)
        hint = f"did you mean 'gym {close[0]}'? " if close else ""
        what = "an option" if first.startswith("-") else "a command"
        return _error(f"'{first}' is not {what} of gym; {hint}commands: "
                      f"{', '.join(COMMANDS)} (gym --help)")
    rest = args[1:]
    if first == "plugins" and rest and rest != ["--help"]:
        return _error(f"gym plugins takes no arguments; got {' '.join(rest)}")
    if first == "plugins" and rest == ["--help"]:
        print("usage: gym plugins\n\nEvery installed plugin: its distribution, version, "
              "plugin API, the config-group options it adds and the hooks it implements.")
        return 0
    return run_module(first, command, rest)


def run_module(name: str, command: Command, rest: list[str]) -> int:
    """Run ``python -m <command.module> [command.args] rest`` in this process."""
    main_module = command.module if command.module.endswith("__main__") else (
        f"{command.module}.__main__" if _is_package(command.module) else command.module)
    if importlib.util.find_spec(command.module) is None or (
            main_module.endswith("__main__") and importlib.util.find_spec(main_module) is None):
        return _error(f"gym {name} runs python -m {command.module}, which is not installed"
                      + (f": it needs {command.needs}" if command.needs else ""))
    prog = "gym" if command.module == "gym_core" else f"gym {name}"
    sys.argv = [prog, *command.args, *rest]
    try:
        runpy.run_module(command.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # the programs end with sys.exit(...)
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def entry() -> None:
    """The ``gym`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
