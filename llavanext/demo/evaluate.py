"""Score a demo run on held-out questions: its greedy answers next to the truth.

`python -m llavanext.demo.evaluate outputs/demo/finetune`
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llavanext.data.sources import image_paths
from llavanext.decoding import Sampling
from llavanext.demo.shapes import QUESTIONS, ensure_dataset
from llavanext.generate import Request, load
from llavanext.run import load_run_config

CHANCE = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 2}


def answer_all(run: str | Path, limit: int | None = None, batch_size: int = 16) -> list[dict]:
    """The run's greedy answers through `llavanext generate`'s code, next to the truth."""
    generator = load(str(run))
    cfg = load_run_config(run)
    root = ensure_dataset(cfg.data.num_train, cfg.data.num_val, cfg.data.seed)
    records = json.loads((root / "val.json").read_text())[:limit]
    results = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prepared = [generator.prepare(Request(r["conversations"][0]["value"], [root / p for p in image_paths(r)],
                                              Sampling(max_new_tokens=6), id=r["id"])) for r in chunk]
        for record, answer in zip(chunk, generator.answer(prepared)):
            truth = record["conversations"][1]["value"]
            results.append({"id": record["id"], "kind": record["kind"], "question": QUESTIONS[record["kind"]],
                            "truth": truth, "answer": answer.text, "correct": answer.text == truth})
    return results


def accuracy(results) -> dict[str, float]:
    totals, right = Counter(r["kind"] for r in results), Counter(r["kind"] for r in results if r["correct"])
    out = {kind: right[kind] / totals[kind] for kind in totals}
    out["all"] = sum(right.values()) / max(1, len(results))
    return out


def chance(results) -> float:
    return sum(CHANCE[r["kind"]] for r in results) / max(1, len(results))


def report(results, console: Console, show: int = 12) -> None:
    table = Table(title="Held-out questions (first few)", title_justify="left")
    for column in ("question", "truth", "answer", ""):
        table.add_column(column)
    for r in results[:show]:
        table.add_row(r["question"], r["truth"], r["answer"], "[green]✓[/]" if r["correct"] else "[red]✗[/]")
    console.print(table)
    acc = accuracy(results)
    per_kind = "  ".join(f"{k} {v:.0%}" for k, v in acc.items() if k != "all")
    console.print(f"[bold]accuracy {acc['all']:.0%}[/] on {len(results)} held-out questions "
                  f"(chance {chance(results):.0%});  {per_kind}")


if __name__ == "__main__":
    report(answer_all(sys.argv[1]), Console())
