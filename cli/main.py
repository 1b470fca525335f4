"""`llavanext <command> [overrides]`: dispatch a command to its Hydra config and its task.

Only the standard library is imported until a command is chosen, so `llavanext --help`
answers at once; Hydra, torch and the task load afterwards, and only the one needed.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    summary: str
    example: str
    task: str | None  # "module:function"; None until its issue lands
    issue: int | None = None


COMMANDS = {
    "import": Command("bring a Hugging Face checkpoint into the local model store",
                      "llavanext import source=hf://llava-hf/llava-v1.6-vicuna-7b-hf", None, 3),
    "pretrain": Command("stage 1: align the projector (vision tower and language model frozen)",
                        "llavanext pretrain model=tiny data=demo", "llavanext.train:run"),
    "finetune": Command("stage 2: train projector + language model, full or LoRA",
                        "llavanext finetune model=tiny data=demo peft=lora peft.r=8", "llavanext.train:run"),
    "generate": Command("answer prompts about images from a run, a store model or a HF folder",
                        "llavanext generate checkpoint=outputs/finetune/<run> image=cat.png prompt='What is it?'",
                        "llavanext.generate:run"),
    "data": Command("check a dataset before training (`data check`), or write it for energon (`data prepare`)",
                    "llavanext data check data=llava_json data.path=llava.json model=7b", "data"),
    "export": Command("write a training checkpoint as a Hugging Face folder (LoRA merged or as adapter)",
                      "llavanext export checkpoint=outputs/finetune/<run> out=exported/", None, 3),
}
# `llavanext data <sub>`: each sub-command has its own primary config, conf/data_<sub>.yaml
DATA_COMMANDS = {
    "check": Command("scan a dataset: bad records, token/tile histograms, truncation at seq_length",
                     "llavanext data check data=llava_json data.path=llava.json model=7b", "llavanext.data.check:run"),
    "prepare": Command("write LLaVA JSON + images as energon WebDataset shards",
                       "llavanext data prepare data.path=llava.json out=/data/llava-wds", "llavanext.data.prepare:run"),
}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
# Keys that hold free text: quoted for Hydra, so a prompt may hold commas, quotes, brackets and `${`.
FREE_TEXT = {"generate": ("prompt", "system")}
HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["llavanext: train LLaVA-NeXT vision-language models from declarative configs", "",
             "Usage: llavanext <command> [group=option ...] [key=value ...] [-m] [--cfg job]", "",
             "Commands:"]
    for name, cmd in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {cmd.summary}")
    lines += ["", "Examples:"]
    lines += [f"  {cmd.example}" for cmd in COMMANDS.values()]
    lines.append(f"  {DATA_COMMANDS['prepare'].example}")
    lines += ["  llavanext finetune --cfg job model=7b peft=lora      print the composed config, run nothing",
              "  llavanext finetune -m optim.lr=1e-4,3e-4             a sweep: one run per value", "",
              "`llavanext <command> --help` lists the command's config groups and keys."]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> None:
    print(f"llavanext: {message}", file=sys.stderr)
    sys.exit(code)


def overrides_of(args: list[str]) -> list[str]:
    """The key=value words of a Hydra command line (flags and their values left out)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def quote_free_text(name: str, args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
        if eq and key in FREE_TEXT.get(name, ()) and not quoted:
            value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # Hydra escapes \ only before '
            value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value).replace("${", "\\${")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def run_task(name: str, command: Command, args: list[str]) -> None:
    args = quote_free_text(name, args)
    if not any(a in HYDRA_INFO_FLAGS for a in args):
        from llavanext.cli.overrides import check_overrides

        problem = check_overrides(name, overrides_of(args))
        if problem:
            fail(problem)

    import hydra

    from llavanext.errors import LlavaNextError

    module_name, function_name = command.task.split(":")
    started = False

    def task(cfg):
        nonlocal started
        started = True
        try:
            return getattr(importlib.import_module(module_name), function_name)(cfg)
        except LlavaNextError as e:
            fail(str(e), code=1)

    sys.argv = [f"llavanext {name}", *args]
    try:
        hydra.main(config_path="pkg://llavanext.conf", config_name=name, version_base="1.3")(task)()
    except Exception as e:  # Hydra's own command-line errors; a task's bugs keep their traceback
        if started:
            raise
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if args[0] == "--version":
        from llavanext import __version__

        print(f"llavanext {__version__}")
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        fail(f"unknown command '{name}'.{hint} Commands: {', '.join(COMMANDS)}")
    command = COMMANDS[name]
    if command.task is None:
        fail(f"'{name}' is not built yet (issue #{command.issue}); nothing was done.")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    if name == "data":
        sub = rest[0] if rest else None
        if sub not in DATA_COMMANDS:
            lines = "\n".join(f"  data {n:<8} {c.summary}\n    {c.example}" for n, c in DATA_COMMANDS.items())
            fail(f"data needs a sub-command:\n{lines}")
        name, command, rest = f"data_{sub}", DATA_COMMANDS[sub], rest[1:]
    run_task(name, command, rest)


if __name__ == "__main__":
    main()
