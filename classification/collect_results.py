"""Tabulate classification runs: arch, keep rate, top-1/top-5 of the last and the best epoch, the paper
formula's FLOPs reduction, the small model's real one, and params.

    python -m classification.collect_results --logs ./logs ./snapshots     # -> results.md / results.csv
"""
import argparse
import json
from pathlib import Path

from toolkit import cli, utils

COLUMNS = ["run", "arch", "rate", "epochs", "top1_last", "top5_last", "top1_best", "top5_best", "best_epoch",
           "paper_flops_down", "real_flops_down", "params_M", "small_params_M"]


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logs", nargs="+", default=["./logs", "./snapshots"], help="folders searched for metrics.json")
    p.add_argument("--out", default="./logs/summary", help="where results.md and results.csv are written")
    return p


def rows(folders: list[str]) -> list[dict]:
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            try:
                m = json.loads(path.read_text())
                paper = m.get("paper_reduction")
                found.append({"run": str(path.parent), "arch": m["arch"], "rate": m["rate"], "epochs": m["epochs"],
                              "top1_last": m["top1_last"], "top5_last": m["top5_last"], "top1_best": m["top1_best"],
                              "top5_best": m["top5_best"], "best_epoch": m["best_epoch"],
                              "paper_flops_down": None if paper is None else round(100 * paper, 1),
                              "real_flops_down": round(100 * m["real_reduction"], 1),
                              "params_M": round(m["params"] / 1e6, 3),
                              "small_params_M": round(m["small_params"] / 1e6, 3)})
            except (ValueError, KeyError, TypeError):
                print(f"note: skipping {path} (not a classification run's metrics)")
    return found


def main(args: argparse.Namespace) -> list[dict]:
    table = rows(args.logs)
    if not table:
        raise cli.UsageError(f"no classification metrics.json under {', '.join(args.logs)}")
    fmt = lambda v: "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in table]
    note = ("\nlast = the last epoch; best = the epoch with the highest test top-1 (chosen on the test set, as "
            "the SFP code does). paper = the SFP paper's fractional FLOPs formula (CIFAR only); real = the small "
            "model's MACs by torch.utils.flop_counter.\n")
    out = Path(args.out)
    utils.write_text_atomic("\n".join(md) + "\n" + note, out / "results.md")
    utils.write_csv_atomic(table, COLUMNS, out / "results.csv")
    print("\n".join(md) + note + f"wrote {out}/results.md and results.csv")
    return table


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), ())
