"""Collect every run under ./results into one table (Markdown + CSV) and mAP-vs-MACs plots (PNG).

    python collect_results.py                       # ./results -> ./results/summary/
    python collect_results.py --results_dir /data/results --out /tmp/summary

Per run it reads the metrics that scripts/test.sh and scripts/small_test.sh saved beside the checkpoint
(metrics_last.json, metrics_last_small.json, runtime_last_cpu.json); a run with features but no metrics is
evaluated (and its metrics saved); params and MACs of the small model are counted from the checkpoint
when no runtime table exists.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit import cli, data, utils
from toolkit.layouts import DatasetError

COLUMNS = ["method", "arch", "dataset", "prune_rate", "R1", "R5", "R10", "mAP", "mINP", "params_M", "GMACs",
           "cpu_ms_b1", "run"]


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", default="./results", help="root folder of the runs (ft_<arch>/<name>/)")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/summary)")
    p.add_argument("--which_epoch", default="last", help="checkpoint whose metrics are collected")
    p.add_argument("--input_size", default="256,128", help="height,width at which MACs are counted")
    return p


def run_metrics(run: Path, epoch: str) -> dict:
    """Saved metrics of a run, evaluating pytorch_result.mat when only the features exist."""
    saved = run / f"metrics_{epoch}.json"
    if saved.is_file():
        try:
            return json.loads(saved.read_text())
        except ValueError:
            raise DatasetError(f"{saved} is corrupt or truncated: delete it to recompute it from the features") \
                from None
    features = run / "pytorch_result.mat"
    if not features.is_file():
        return {}
    from toolkit.ranking import mat_metrics
    result = mat_metrics(features)
    utils.write_text_atomic(json.dumps(result, indent=2), saved)
    return result


def small_cost(run: Path, epoch: str, method: str, size: tuple[int, int]) -> tuple[int, int] | None:
    """(params, MACs) of the run's small model, from its runtime table or counted from the checkpoint."""
    table = run / f"runtime_{epoch}_cpu.json"
    if table.is_file():
        small = next(r for r in json.loads(table.read_text()) if r["model"] == "small")
        return small["params"], small["macs"]
    ckpt = run / f"net_{epoch}.pth"
    if not ckpt.is_file():
        return None
    import model as model_lib
    from toolkit import surgery
    from toolkit.surgery import small_from_checkpoint
    state = model_lib.load_checkpoint(ckpt)
    from toolkit.hooks import METHODS
    nonl1 = method in METHODS and METHODS[method].checkpoint == "zeroed"
    try:
        _, small = small_from_checkpoint(state, nonl1)
    except model_lib.ModelError:  # e.g. an unpruned baseline: count the model as it is
        small = surgery.model_from_state_dict(state)
    return model_lib.inference_params(small), utils.count_macs(small, size)


def collect(results_dir: Path, epoch: str = "last", size: tuple[int, int] = (256, 128)) -> list[dict]:
    rows = []
    for opts_file in sorted(results_dir.glob("ft_*/*/opts.yaml")):
        run = opts_file.parent
        opts = utils.load_options(opts_file)
        method = opts.get("method", "baseline")
        row = {"method": method, "arch": opts.get("network_arch", run.parent.name[3:]),
               "dataset": data.dataset_name(str(opts.get("data_dir", ""))),
               "prune_rate": opts.get("prune_rate") if method != "baseline" else 0.0, "run": str(run)}
        metrics = run_metrics(run, epoch)
        if metrics:
            standard = metrics if metrics.get("protocol") == "standard" else metrics.get("standard", {})
            row.update(R1=metrics["rank1"], R5=metrics["rank5"], R10=metrics["rank10"], mAP=metrics["mAP"],
                       mINP=standard.get("mINP"))
        cost = small_cost(run, epoch, method, size)
        if cost:
            row.update(params_M=cost[0] / 1e6, GMACs=cost[1] / 1e9)
        table = run / f"runtime_{epoch}_cpu.json"
        if table.is_file():
            row["cpu_ms_b1"] = next(r for r in json.loads(table.read_text()) if r["model"] == "small").get("ms_b1")
        rows.append(row)
    return rows


def fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per dataset: mAP against GMACs, a colour per method and a marker per arch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    markers = {"resnet18": "o", "resnet34": "s", "resnet50": "^"}
    for dataset in sorted({r["dataset"] for r in rows}):
        points = [r for r in rows if r["dataset"] == dataset and r.get("mAP") is not None and r.get("GMACs")]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method in sorted({r["method"] for r in points}):
            for arch in sorted({r["arch"] for r in points}):
                sel = sorted((r for r in points if r["method"] == method and r["arch"] == arch),
                             key=lambda r: r["GMACs"])
                if sel:
                    ax.plot([r["GMACs"] for r in sel], [100 * r["mAP"] for r in sel], marker=markers.get(arch, "x"),
                            label=f"{method} {arch}")
        ax.set_xlabel("GMACs of the small model")
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"{dataset}: mAP vs MACs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"mAP_vs_MACs_{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(args: argparse.Namespace) -> list[dict]:
    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        utils.fail(f"results folder {results_dir} does not exist")
    out = Path(args.out or results_dir / "summary")
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.input_size.split(","))
    rows = collect(results_dir, args.which_epoch, size)
    table = markdown(rows)
    utils.write_text_atomic(table, out / "results.md")
    utils.write_csv_atomic(rows, COLUMNS, out / "results.csv")
    plots = plot(rows, out)
    print(table)
    print(f"{len(rows)} runs -> {out / 'results.md'}, {out / 'results.csv'}")
    for path in plots:
        print(f"plot: {path}")
    return rows


if __name__ == "__main__":
    import model as model_lib
    from toolkit.ranking import EvaluationError
    utils.run_main(main, get_args_parser().parse_args(), (DatasetError, EvaluationError, model_lib.ModelError))
