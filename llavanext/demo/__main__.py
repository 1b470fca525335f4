"""`make demo`: stage 1 then stage 2 on the tiny model through the CLI, then held-out questions.

`python -m llavanext.demo [--out outputs/demo] [--quick]`
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

# Each stage's overrides: what a user would type after `llavanext pretrain` / `finetune`.
PRETRAIN = ["model=tiny", "data=demo", "trainer.max_steps=200", "trainer.print_every=25"]
FINETUNE = ["model=tiny", "data=demo", "trainer.max_steps=500", "trainer.print_every=25", "optim.lr=1e-3", "optim.min_lr=1e-5",
            "optim.warmup_steps=50"]


def stage(console: Console, command: str, overrides: list[str], run_dir: Path) -> None:
    args = [sys.executable, "-m", "llavanext", command, *overrides, f"hydra.run.dir={run_dir}",
            "trainer.progress_bar=none"]
    console.rule(f"[bold]llavanext {command} " + " ".join(overrides))
    started = time.perf_counter()
    subprocess.run(args, check=True)
    console.print(f"{command} took {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="where the two runs go (replaced)")
    args = parser.parse_args()
    console = Console()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stage(console, "pretrain", PRETRAIN, out / "pretrain")
    stage(console, "finetune", FINETUNE + [f"init_from={out / 'pretrain'}"], out / "finetune")

    from llavanext.demo.evaluate import accuracy, answer_all, chance, report

    console.rule("[bold]held-out questions")
    results = answer_all(out / "finetune")
    report(results, console)
    summary = {"accuracy": accuracy(results), "chance": chance(results), "n": len(results)}
    (out / "accuracy.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
