"""The one training loop of the classification scripts (CIFAR and ImageNet recipes, with or without SFP).

pruning_cifar10_resnet.py, pruning_train.py and original_train.py only translate their command lines
(the SFP code's flag names) into a `Recipe`; `run` does the rest, top to bottom: data, model, masks,
optimiser, then per epoch train -> mask -> evaluate (the accuracy reported is after masking) -> save.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import model as reid_model
from classification import data as cdata
from classification import flops
from classification.models import CIFAR_DEPTHS, ModelError, build_model, check_arch, conv_units
from classification.sfp import SoftFilterMask, pruned_layers
from classification.small import has_constants, inner_only, make_small_model, zero_filters
from toolkit import distributed, utils
from toolkit import run as scaffold
from toolkit.layouts import DatasetError

TrainingError = scaffold.RunError  # the name the classification scripts know


USER_ERRORS = (DatasetError, reid_model.ModelError, TrainingError)  # ModelError of both packages


@dataclass
class Recipe:
    """One run, whatever script it came from."""
    data: str
    arch: str
    save_dir: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    workers: int
    seed: int
    schedule: list[int] = field(default_factory=list)  # CIFAR: lr x gammas[i] from epoch schedule[i]
    gammas: list[float] = field(default_factory=list)
    lr_adjust: int = 0  # ImageNet: lr / 10 every lr_adjust epochs
    prune: bool = False
    rate: float = 1.0
    layer_begin: int = 0
    layer_end: int = 0
    layer_inter: int = 3
    epoch_prune: int = 1
    skip_downsample: bool = True
    prune_bn: bool = False
    pretrained: bool | str = False
    sparse: str | None = None
    resume: str | None = None
    evaluate: bool = False
    gpu_ids: str = "0"
    image_size: int = 224

    @property
    def cifar(self) -> bool:
        return self.arch in CIFAR_DEPTHS

    def learning_rate(self, epoch: int) -> float:
        """lr of 0-based `epoch` (the SFP code's adjust_learning_rate for each recipe)."""
        if self.lr_adjust:
            return self.lr * 0.1 ** (epoch // self.lr_adjust)
        lr = self.lr
        for gamma, start in zip(self.gammas, self.schedule):
            if epoch < start:
                break
            lr *= gamma
        return lr


def check_recipe(r: Recipe) -> None:
    check_arch(r.arch)
    if r.schedule and len(r.schedule) != len(r.gammas):
        raise ModelError(f"--schedule has {len(r.schedule)} epochs but --gammas {len(r.gammas)} factors")
    if r.evaluate and not r.resume:
        raise ModelError("-e/--evaluate needs --resume CHECKPOINT (the model to evaluate)")
    if r.sparse and r.resume:
        raise ModelError("--use_sparse starts a new run from --sparse; --resume continues one: give one of them")
    if r.prune and not 0 < r.rate <= 1:
        raise ModelError(f"--rate is the fraction of filters KEPT, in (0, 1]; got {r.rate}")
    if r.pretrained and (r.sparse or r.resume):
        raise ModelError("--use_pretrain starts from ImageNet weights; --sparse/--resume give other weights")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of these scripts, or one of the SFP reference code (see `from_reference_layout`)."""
    state = reid_model.load_checkpoint(path, "state_dict", "a checkpoint of the classification scripts")
    return state if "num_classes" in state else from_reference_layout(state, path)


def from_reference_layout(state: dict, path: str | Path) -> dict:
    """The SFP ImageNet code's checkpoint, {epoch, arch, state_dict, best_prec1, optimizer} with DataParallel's
    `module.` key prefix, in this package's form: the classes from fc.weight, the pruned convs from their
    all-zero filters. (The SFP CIFAR code pickles whole model objects, which are refused on loading.)"""
    weights = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    arch = state.get("arch")
    if not isinstance(arch, str) or "fc.weight" not in weights:
        raise ModelError(f"{path} is neither a checkpoint of these scripts nor one of the SFP reference code "
                         "(no num_classes, or no arch and fc.weight)")
    check_arch(arch)
    net = build_model(arch, weights["fc.weight"].shape[0])
    load_weights(net, {"state_dict": weights, "arch": arch}, path)
    zeros = zero_filters(net, [u.conv for u in conv_units(net)])
    return {"arch": arch, "num_classes": weights["fc.weight"].shape[0], "state_dict": weights,
            "layers": [name for name, idx in zeros.items() if len(idx)],
            "image_size": 32 if arch in CIFAR_DEPTHS else 224, "reference_layout": True}


def load_weights(net: nn.Module, state: dict, path: str | Path) -> None:
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError:
        why, arch = scaffold.state_dict_mismatch(net, state["state_dict"]), getattr(net, "arch", "?")
        raise ModelError(f"{path} ({state.get('arch', '?')}) does not fit the {arch} being built: {why}") from None


def shrink(state: dict, path: str, deploy: bool = False) -> tuple:
    """(the network with zeros, its small model, the removed filters per conv, whether BN constants are
    carried) of an engine.load_checkpoint state."""
    net = build_model(state["arch"], state["num_classes"])
    load_weights(net, state, path)
    net.eval()
    pruned = zero_filters(net, state.get("layers", []))
    with_constants = has_constants(net, pruned)
    if deploy:
        pruned = inner_only(net, pruned)
    return net, make_small_model(net, pruned, with_constants).eval(), pruned, with_constants


def dataset(data: str, arch: str, train: bool, image_size: int = 224) -> torch.utils.data.Dataset:
    """The CIFAR-10 or ImageNet train or test set, as the arch's recipe transforms it."""
    if arch in CIFAR_DEPTHS:
        return cdata.Cifar10(data, train, cdata.cifar_transforms(train))
    return cdata.imagenet_folder(data, train, image_size)


def datasets(r: Recipe) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset, int]:
    """(train set, or None when only evaluating; test set; number of classes)."""
    test = dataset(r.data, r.arch, False, r.image_size)
    train = None if r.evaluate else dataset(r.data, r.arch, True, r.image_size)
    if r.cifar:
        return train, test, 10
    if train is not None and train.classes != test.classes:
        raise DatasetError(f"{r.data}: train/ and val/ have different class folders")
    return train, test, len(test.classes)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Correct predictions (counts) within the top k, for each k."""
    k = min(max(topk), logits.shape[1])
    pred = logits.topk(k, 1).indices
    hit = pred == target[:, None]
    return [float(hit[:, :min(t, k)].any(1).sum()) for t in topk]


def train_one_epoch(model: nn.Module, loader, optimizer, device: torch.device, epoch: int, r: Recipe) -> dict:
    model.train()
    loader.sampler.set_epoch(epoch)
    criterion = nn.CrossEntropyLoss()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, images
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{r.epochs}", leave=False, mininterval=1.0,
               disable=None if distributed.is_main() else True)
    for step, (images, target) in enumerate(bar, 1):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, target)
        loss_value = loss.item()
        scaffold.check_finite_loss(loss_value, f"epoch {epoch + 1}, step {step}/{len(loader)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.tensor([loss_value * len(target), *accuracy(logits.detach(), target), len(target)],
                               dtype=torch.float64)
        bar.set_postfix(loss=f"{totals[0].item() / totals[3].item():.3f}")
    loss, top1, top5, n = distributed.sum_over_ranks(totals.tolist(), device)
    return {"loss": loss / max(n, 1), "train_top1": 100 * top1 / max(n, 1), "seconds": time.time() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict:
    """Top-1 / top-5 (%) over the whole test set (summed over ranks under torchrun)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for images, target in tqdm(loader, desc="test", leave=False, mininterval=1.0,
                               disable=None if distributed.is_main() else True):
        logits = model(images.to(device, non_blocking=True))
        totals += torch.tensor([*accuracy(logits, target.to(device)), len(target)], dtype=torch.float64)
    top1, top5, n = distributed.sum_over_ranks(totals.tolist(), device)
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1)}


def cost_report(net: nn.Module, r: Recipe, layers: list[str]) -> dict:
    """Params and MACs of the network and of its small model (from the current zeros), and the paper's
    formula, as numbers and as one printable line."""
    size = 32 if r.cifar else r.image_size
    full_macs, full_params = flops.macs(net, size), flops.params(net)
    pruned = zero_filters(net, layers)
    with torch.random.fork_rng(devices=[]):  # building modules draws random inits: keep training's RNG as is
        small = make_small_model(net, pruned, has_constants(net, pruned))
    small_macs, small_params = flops.macs(small, size), flops.params(small)
    paper = flops.paper_reduction(r.arch, r.rate) if r.prune else 0.0
    report = {"macs": full_macs, "params": full_params, "small_macs": small_macs, "small_params": small_params,
              "real_reduction": 1 - small_macs / full_macs, "paper_reduction": paper}
    paper_text = f"paper formula {100 * paper:.1f}% fewer FLOPs, " if paper is not None else ""
    report["line"] = (f"{paper_text}small model {small_macs / 1e6:.2f} M MACs of {full_macs / 1e6:.2f} M "
                      f"({100 * report['real_reduction']:.1f}% fewer, flop_counter at {size}x{size}), "
                      f"{small_params / 1e6:.3f} M of {full_params / 1e6:.3f} M params")
    return report


def write_log(history: list[dict], path: Path) -> None:
    utils.write_csv_atomic(history, ["epoch", "lr", "loss", "train_top1", "top1", "top5", "seconds"], path)


def run_folder(r: Recipe, overwrite: bool) -> scaffold.RunFolder | None:
    """The save folder (None for -e): an existing run there needs --overwrite, or --resume of its own
    checkpoint.pth (a --resume from elsewhere starts a new run folder at that epoch)."""
    if r.evaluate:
        return None
    out = Path(r.save_dir)
    resuming_here = bool(r.resume) and Path(r.resume).resolve().parent == out.resolve()
    scaffold.check_run_flags(bool(r.resume), overwrite)  # also a --resume from another folder
    return scaffold.RunFolder(out, resume=resuming_here, overwrite=overwrite,
                              markers=("checkpoint.pth", "model_best.pth"),
                              resume_file=Path(r.resume).name if resuming_here else "checkpoint.pth",
                              resume_hint=f"pass --resume {out / 'checkpoint.pth'} to continue it",
                              elsewhere="choose another save folder",
                              inputs=[r.data, r.sparse, r.resume,
                                      r.pretrained if isinstance(r.pretrained, str) else None])


# the options that define a run: a --resume must match them (paths compared resolved)
RUN_DEFINING = ("arch", "data", "prune", "rate", "layer_begin", "layer_end", "layer_inter", "epoch_prune",
                "prune_bn", "skip_downsample")


def run_definition(r: Recipe) -> dict:
    return {k: (str(Path(r.data).resolve()) if k == "data" else getattr(r, k)) for k in RUN_DEFINING}


def check_same_recipe(r: Recipe, resume: dict) -> None:
    """--resume continues the run it names: the first option that differs is an error."""
    saved = resume.get("recipe")
    if saved is None:  # written before the recipe was saved: what the checkpoint itself tells
        saved = {"arch": resume["arch"], "prune_bn": resume.get("prune_bn", False)}
        if resume.get("rate", 1.0) != 1.0:
            saved["rate"] = resume["rate"]
    scaffold.check_same_run(saved, run_definition(r), r.resume, RUN_DEFINING, path_keys=("data",))


def run(r: Recipe, overwrite: bool = False) -> dict:
    """Train (and prune), or with r.evaluate only evaluate; returns the final metrics."""
    check_recipe(r)
    folder = run_folder(r, overwrite)
    resume = load_checkpoint(r.resume) if r.resume else None
    sparse = load_checkpoint(r.sparse) if r.sparse else None
    if resume is not None and resume.get("reference_layout") and not r.evaluate:
        raise TrainingError(f"--resume {r.resume} was written by the SFP reference code: evaluate it with -e, "
                            "shrink it with classification.get_small, or start from it with --use_sparse")
    if resume is not None and not r.evaluate:
        if "optimizer" not in resume:
            raise TrainingError(f"--resume {r.resume} holds no optimiser or epoch state (model_best.pth?): resume "
                                "from the run's checkpoint.pth, or start from these weights with --use_sparse")
        check_same_recipe(r, resume)
    device = distributed.setup(r.gpu_ids)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    utils.seed_everything(r.seed + rank)
    train_set, test_set, num_classes = datasets(r)
    test_loader = cdata.make_loader(test_set, r.batch_size, False, r.workers, r.seed, rank, world,
                                    device.type == "cuda")
    torch.manual_seed(r.seed)  # the same initial model on every rank
    net = build_model(r.arch, num_classes, r.pretrained).to(device)
    if rank:  # augmentation differs per rank; rank 0 goes on with the stream a single process uses
        torch.manual_seed(r.seed + rank)
    for state, path in ((resume, r.resume), (sparse, r.sparse)):
        if state is not None:
            load_weights(net, state, path)
    layers = pruned_layers(net, r.layer_begin, r.layer_end, r.layer_inter, r.skip_downsample) if r.prune else []
    mask = SoftFilterMask(layers, r.rate, r.prune_bn) if r.prune else None
    if r.evaluate:
        metrics = evaluate(net, test_loader, device)
        if main:
            print(f"{r.resume}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
                  f"({len(test_set)} test images, the weights as saved)")
        return metrics
    train_loader = cdata.make_loader(train_set, r.batch_size, True, r.workers, r.seed, rank, world,
                                     device.type == "cuda")
    optimizer = torch.optim.SGD(net.parameters(), lr=r.learning_rate(0), momentum=r.momentum,
                                weight_decay=r.weight_decay, nesterov=r.nesterov)
    start, history, best = 0, [], {"top1": -1.0, "epoch": 0}
    if resume is not None and "optimizer" in resume:
        optimizer.load_state_dict(resume["optimizer"])
        start, history, best = resume["epoch"], resume["history"], resume["best"]
        scaffold.restore_rng(resume["rng"])  # one state per rank (a file written before that holds rank 0's only)
    elif mask is not None:  # SFP masks once before training
        mask.step(net)
        distributed.broadcast_module(net)
    model = net if world == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == "cuda" else None)
    if main:
        what = f"SFP keep {r.rate} on {len(layers)} convs" if r.prune else "no pruning"
        print(f"{r.arch}: {num_classes} classes, {len(train_set)} train / {len(test_set)} test images, {what}, "
              f"device {device}{f' x {world}' if world > 1 else ''}, outputs in {folder.final}")
        if r.prune:
            print("  " + cost_report(net, r, layers)["line"])
    folder.start()
    try:
        for epoch in range(start, r.epochs):
            train_epoch(epoch, net, model, mask, optimizer, train_loader, test_loader, device, r, folder, history,
                        best, (num_classes, layers))
        result = finish(net, r, layers, history, best, folder.path) if main and history else {}
    except BaseException:
        folder.discard()
        raise
    distributed.cleanup()
    return result


def train_epoch(epoch: int, net: nn.Module, model: nn.Module, mask, optimizer, train_loader, test_loader,
                device: torch.device, r: Recipe, folder: scaffold.RunFolder, history: list[dict], best: dict,
                shape: tuple[int, list[str]]) -> None:
    """Train, mask, evaluate (the accuracy reported is after masking), then rank 0's files; `best` is
    updated in place."""
    main = distributed.is_main()
    lr = r.learning_rate(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    stats = train_one_epoch(model, train_loader, optimizer, device, epoch, r)
    scaffold.check_finite_weights(net, f"epoch {epoch + 1}")
    if mask is not None and (epoch % r.epoch_prune == 0 or epoch == r.epochs - 1):
        if main:
            mask.step(net)
        distributed.broadcast_module(net)
    metrics = evaluate(model, test_loader, device)
    rng = scaffold.gather_rng()  # every rank's own state, for --resume
    if not main:
        return
    out, (num_classes, layers) = folder.path, shape
    history.append({"epoch": epoch + 1, "lr": lr, **stats, **metrics})
    if metrics["top1"] > best["top1"]:
        best.update(top1=metrics["top1"], top5=metrics["top5"], epoch=epoch + 1)
        scaffold.save_checkpoint(checkpoint(net, r, num_classes, layers, epoch + 1, None, history, best),
                                 out / "model_best.pth")
    print(f"epoch {epoch + 1}/{r.epochs} lr {lr:.4g} loss {stats['loss']:.4f} train {stats['train_top1']:.2f}% "
          f"| test top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%{' after masking' if mask else ''} "
          f"| best {best['top1']:.2f}% (epoch {best['epoch']}) {stats['seconds']:.1f}s", flush=True)
    scaffold.save_checkpoint(checkpoint(net, r, num_classes, layers, epoch + 1, optimizer, history, best, rng),
                             out / "checkpoint.pth")
    write_log(history, out / "log.csv")
    folder.commit()


def checkpoint(net: nn.Module, r: Recipe, num_classes: int, layers: list[str], epoch: int, optimizer,
               history: list[dict], best: dict, rng: list[dict] | None = None) -> dict:
    """Tensors and plain values only (loads with weights_only=True); the recipe comes along for get_small."""
    state = {"arch": r.arch, "num_classes": num_classes, "state_dict": net.state_dict(), "epoch": epoch,
             "layers": layers, "rate": r.rate if r.prune else 1.0, "prune_bn": r.prune_bn, "history": history,
             "best": best, "image_size": 32 if r.cifar else r.image_size, "recipe": run_definition(r)}
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), rng=rng if rng is not None else [utils.rng_state()])
    return state


def finish(net: nn.Module, r: Recipe, layers: list[str], history: list[dict], best: dict, out: Path) -> dict:
    last = history[-1]
    result = {"arch": r.arch, "rate": r.rate if r.prune else 1.0, "prune_bn": r.prune_bn, "epochs": last["epoch"],
              "top1_last": last["top1"], "top5_last": last["top5"], "top1_best": best["top1"],
              "top5_best": best["top5"], "best_epoch": best["epoch"]}
    cost = cost_report(net, r, layers)
    result.update({k: v for k, v in cost.items() if k != "line"})
    utils.write_text_atomic(json.dumps(result, indent=2), out / "metrics.json")
    print(f"last epoch: top-1 {last['top1']:.2f}% top-5 {last['top5']:.2f}%; best epoch ({best['epoch']}, "
          f"chosen on the test set as the SFP code does): top-1 {best['top1']:.2f}% top-5 {best['top5']:.2f}%")
    print(cost["line"])
    return result


def add_device_args(p: argparse.ArgumentParser) -> None:
    from toolkit import cli
    p.add_argument("--gpu_ids", default="0", help="GPU id; the CPU is used when CUDA is absent (several GPUs: "
                                                  "torchrun --nproc_per_node N -m classification....)")
    p.add_argument("--prune_bn", action="store_true",
                   help="also zero the BN weight and bias of pruned filters (the re-ID scripts' semantics); "
                        "default: conv weights only, as the SFP code")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the save folder")
    p.add_argument("--image_size", type=cli.positive_int, default=224,
                   help="ImageNet crop size (224 in the paper; smaller for quick runs)")
