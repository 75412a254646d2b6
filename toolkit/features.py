"""Re-ID features of a trained ft_net, small model or run folder, as test.py writes them and other tools
(test_small.py, iterative_compress.py, runtime_comparison.py) reuse them: f(x) + f(flip(x)), L2-normalised,
ids and cameras from the file names, and the flags test.py and test_small.py share."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import model as model_lib
from toolkit import cli, data, distributed, surgery, utils
from toolkit.layouts import DatasetError
from toolkit.ranking import evaluate, image_paths


def add_test_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """test.py's flags (test_small.py adds its own to them)."""
    p.add_argument("--name", required=True,
                   help="run folder, or a run name looked up as RESULTS_DIR/ft_<arch>/<name>")
    p.add_argument("--which_epoch", default="last", help="checkpoint net_<which_epoch>.pth: 'last' or an epoch")
    p.add_argument("--test_dir", default="./datasets/Market/pytorch",
                   help="a prepared dataset's pytorch/ folder (uses its query/ and gallery/)")
    p.add_argument("--results_dir", default="./results", help="root folder of all runs")
    p.add_argument("--gpu_ids", default="0", help="GPU id; the CPU is used when CUDA is absent")
    p.add_argument("--batchsize", type=cli.positive_int, default=128, help="images per forward pass")
    p.add_argument("--workers", type=cli.nonnegative_int, default=4, help="data-loading worker processes")
    p.add_argument("--height", type=cli.positive_int, default=None,
                   help="input height (default: the run's opts.yaml, else 256)")
    p.add_argument("--width", type=cli.positive_int, default=None,
                   help="input width (default: the run's opts.yaml, else 128)")
    p.add_argument("--mat", default="pytorch_result.mat", help="where to write the features")
    p.add_argument("--multi", action="store_true",
                   help="also write multi-query features from the dataset's multi-query/ folder (Market)")
    p.add_argument("--multi_mat", default=None,
                   help="where --multi writes them (default: multi_query.mat beside --mat)")
    p.add_argument("--network_arch", default=None,
                   help="expected arch (resnet18/34/50), checked against the checkpoint's; the arch itself is "
                        "always read from the checkpoint")
    return p



def find_run(name: str, results_dir: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    matches = sorted(Path(results_dir).glob(f"ft_*/{name}"))
    if len(matches) != 1:
        where = f"{results_dir}/ft_*/{name}"
        raise DatasetError(f"no run {name!r} ({where} does not exist)" if not matches else
                           f"run name {name!r} is ambiguous ({', '.join(map(str, matches))}): pass the folder")
    return matches[0]


@torch.no_grad()
def extract_features(net: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
                     batch_size: int, workers: int, desc: str = "features") -> torch.Tensor:
    """f(x) + f(flip(x)) for every image, L2-normalised, in dataset order.

    Under torchrun each rank extracts a contiguous shard and the shards are gathered in order."""
    net.eval()
    world, rank = distributed.world_size(), distributed.rank()
    bounds = [len(dataset) * r // world for r in range(world + 1)]
    shard = Subset(dataset, range(bounds[rank], bounds[rank + 1]))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, shuffle=False)
    out = []
    for imgs in tqdm(loader, desc=desc, leave=False, mininterval=1.0, disable=None if rank == 0 else True):
        imgs = imgs.to(device)
        f = net.extract(imgs) + net.extract(imgs.flip(3))
        out.append(torch.nn.functional.normalize(f, dim=1).float().cpu())
    return torch.cat([s for shard in distributed.all_gather_object(out) for s in shard])


def reid_accuracy(features: Callable[[torch.utils.data.Dataset], torch.Tensor], test_dir: str | Path,
                  size: tuple[int, int]) -> dict:
    """mAP and Rank-1 (reference protocol) of a feature function over a dataset's query and gallery."""
    transform = data.test_transform(size)
    query, gallery = (data.ReidImages(Path(test_dir) / split, transform) for split in ("query", "gallery"))
    result = evaluate(features(query), query.labels, query.cams, features(gallery), gallery.labels, gallery.cams,
                      device="cpu")
    return {"mAP": result["mAP"], "R1": result["rank1"]}


def load_run_model(run: Path, which_epoch: str, expected_arch: str | None = None) -> tuple[torch.nn.Module, dict]:
    opts_file = run / "opts.yaml"
    opts = utils.load_options(opts_file) if opts_file.is_file() else {}
    checkpoint = run / f"net_{which_epoch}.pth"
    state = model_lib.load_checkpoint(checkpoint)
    model_lib.check_expected_arch(expected_arch, state, checkpoint)
    return surgery.model_from_state_dict(state), opts


def write_features(net: torch.nn.Module, test_dir: str, size: tuple[int, int], device: torch.device,
                   args: argparse.Namespace) -> None:
    """query/gallery features -> args.mat (the reference's keys); with args.multi also multi_query.mat beside it."""
    transform = data.test_transform(size)
    result = {}
    for split in ("gallery", "query"):
        images = data.ReidImages(Path(test_dir) / split, transform)
        feats = finite_features(extract_features(net, images, device, args.batchsize, args.workers, split), split)
        result.update({f"{split}_f": feats.numpy(), f"{split}_label": np.asarray(images.labels),
                       f"{split}_cam": np.asarray(images.cams), f"{split}_path": image_paths(images.paths)})
    if distributed.is_main():
        utils.savemat_atomic(result, args.mat)
        print(f"wrote {args.mat}: {len(result['query_f'])} queries, {len(result['gallery_f'])} gallery images")
    if args.multi:
        images = data.ReidImages(Path(test_dir) / "multi-query", transform)
        feats = finite_features(extract_features(net, images, device, args.batchsize, args.workers, "multi-query"),
                                "multi-query")
        multi_path = Path(args.multi_mat or Path(args.mat).with_name("multi_query.mat"))
        if distributed.is_main():
            utils.savemat_atomic({"mquery_f": feats.numpy(), "mquery_label": np.asarray(images.labels),
                                  "mquery_cam": np.asarray(images.cams)}, multi_path)
            print(f"wrote {multi_path}")


def finite_features(feats: torch.Tensor, split: str) -> torch.Tensor:
    """The features, unless some are NaN/Inf (diverged weights): those would be scored as matches."""
    bad = int((~torch.isfinite(feats).all(1)).sum())
    if bad:
        raise model_lib.ModelError(f"the model gives NaN or infinite features for {bad} {split} image(s) "
                                   "(its weights diverged in training); nothing was written")
    return feats


def input_size(args: argparse.Namespace, opts: dict) -> tuple[int, int]:
    return args.height or opts.get("height", 256), args.width or opts.get("width", 128)
