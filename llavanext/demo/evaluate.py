"""Score a demo run on held-out questions: its greedy answers next to the truth.

`python -m llavanext.demo.evaluate outputs/demo/finetune`
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llavanext.assemble import from_run
from llavanext.data.encoder import TaskEncoder, collate
from llavanext.data.sources import LlavaJsonDataset
from llavanext.data.templates import get_template
from llavanext.demo.shapes import QUESTIONS, ensure_dataset

CHANCE = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 2}


@torch.no_grad()
def answer_all(run: str | Path, limit: int | None = None, batch_size: int = 16) -> list[dict]:
    cfg, built = from_run(run)
    tok = built.tokenizer
    encoder = TaskEncoder(tok, get_template(cfg.template), cfg.model, cfg.data.seq_length, built.image_token_id)
    root = ensure_dataset(cfg.data.num_train, cfg.data.num_val, cfg.data.seed)
    records = json.loads((root / "val.json").read_text())[:limit]
    images = LlavaJsonDataset(records, root, encoder)
    results = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        encoded = [encoder.encode(r["conversations"][:1], images.load_images(r), generation=True) for r in chunk]
        # left padding: generation continues every row from its last real token
        batch = collate(encoded, tok.pad_token_id)
        lengths = batch["attention_mask"].sum(1)
        width = batch["input_ids"].shape[1]
        for i, n in enumerate(lengths.tolist()):
            batch["input_ids"][i] = torch.roll(batch["input_ids"][i], width - n)
            batch["attention_mask"][i] = torch.roll(batch["attention_mask"][i], width - n)
        batch.pop("labels")
        out = built.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        for record, ids in zip(chunk, out[:, width:]):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            truth = record["conversations"][1]["value"]
            results.append({"id": record["id"], "kind": record["kind"], "question": QUESTIONS[record["kind"]],
                            "truth": truth, "answer": text, "correct": text == truth})
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
