"""The one training loop shared by APFP_train.py (BAFD), SFP_train.py, FPGM_train.py and L1_train.py (SPEC §3).

A train script is its argument parser plus the choice of an epoch-end hook (the pruner) and, for HFP,
of the model it starts from. Everything else (data, mining, loss, optimiser, checkpoints, resume)
lives here and is read top to bottom in `train()`.
"""
from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
import model as model_lib
import utils
from dataset_layout import DatasetError


class EpochEndHook:
    """What a pruning method plugs into the loop. The default does nothing."""

    def on_epoch_end(self, net: nn.Module, epoch: int, last: bool) -> str:
        """Modify `net` in place after epoch `epoch` (1-based); return a short note for the log."""
        return ""

    def weights_to_save(self, net: nn.Module, epoch: int, last: bool) -> dict:
        """The state dict written as net_<epoch>.pth / net_last.pth."""
        return net.state_dict()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def add_training_args(parser: argparse.ArgumentParser, lr: float = 0.01) -> argparse.ArgumentParser:
    """The reference training flags shared by the four train scripts, plus our additions."""
    p = parser
    p.add_argument("--gpu_ids", default="0", help="GPU id(s), e.g. 0; the CPU is used when CUDA is absent")
    p.add_argument("--name", default="ft_ResNet", help="run name: outputs go to RESULTS_DIR/ft_<arch>/<name>/")
    p.add_argument("--data_dir", default="./datasets/Market/pytorch", help="a prepared dataset's pytorch/ folder")
    p.add_argument("--train_all", action="store_true", help="train on train_all (train + val) instead of train")
    p.add_argument("--batchsize", type=int, default=32, help="anchors per batch (each brings 4 positives)")
    p.add_argument("--lr", type=float, default=lr, help="learning rate of the head; the backbone uses 0.1 * lr")
    p.add_argument("--Epochs", type=int, default=70, help="number of training epochs")
    p.add_argument("--milestones", default="40,60", help="epochs at which the learning rate is multiplied by 0.1")
    p.add_argument("--save_epoch", type=int, default=60,
                   help="save net_<epoch>.pth from this (1-based) epoch on; net_last.pth is always saved")
    p.add_argument("--network_arch", default="resnet50", help="resnet18, resnet34 or resnet50")
    p.add_argument("--prune_rate", type=float, default=0.9, help="fraction of filters removed")
    p.add_argument("--erasing_p", type=float, default=0.0, help="random erasing probability (0 = off)")
    p.add_argument("--color_jitter", action="store_true", help="use colour jitter in training")
    p.add_argument("--poolsize", type=int, default=128, help="hard negatives are mined among this many positives")
    p.add_argument("--margin", type=float, default=0.3, help="triplet margin on cosine similarities")
    p.add_argument("--pretrained_dir", "--pretrained", dest="pretrained", default=None,
                   help="starting weights: a torchvision ImageNet state dict for the backbone, or a trained "
                        "ft_net checkpoint (default: ImageNet weights from torchvision's local cache)")
    p.add_argument("--no_pretrained", action="store_true", help="train from random initialisation")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, mining, init)")
    p.add_argument("--resume", action="store_true", help="continue RESULTS_DIR/ft_<arch>/<name>/ from resume.pth")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--height", type=int, default=256, help="input height (256 in the paper)")
    p.add_argument("--width", type=int, default=128, help="input width (128 in the paper)")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (ignored on the CPU)")
    p.add_argument("--results_dir", default="./results", help="root folder of all runs")
    return p


USER_ERRORS = (DatasetError, model_lib.ModelError)


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.results_dir) / f"ft_{args.network_arch}" / args.name


def mine_triplets(f: torch.Tensor, pf: torch.Tensor, labels: torch.Tensor, poolsize: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of each anchor with its hard positive and its hard negative.

    f: (B, D) anchor features, pf: (4B, D) positives (4 per anchor, anchor-major), both L2-normalised.
    Hard positive: the least similar of the anchor's 4 positives. Hard negative: the most similar
    sample of another id among a random pool of `poolsize` positives; score 0 when the pool has none.
    Indices are mined without gradient; the scores carry gradient to all three features.
    """
    b = f.shape[0]
    pf4 = pf.view(b, data.NUM_POSITIVES, -1)
    pos_scores = torch.einsum("bd,bkd->bk", f, pf4)
    s_pos = pos_scores.gather(1, pos_scores.detach().argmin(1, keepdim=True)).squeeze(1)
    pool = torch.randperm(pf.shape[0])[:poolsize].to(f.device)
    pool_labels = labels.repeat_interleave(data.NUM_POSITIVES)[pool]
    neg_scores = f @ pf[pool].T
    masked = neg_scores.detach().masked_fill(labels[:, None] == pool_labels[None, :], float("-inf"))
    best, hard = masked.max(1)
    s_neg = neg_scores.gather(1, hard[:, None]).squeeze(1) * torch.isfinite(best)
    return s_pos, s_neg


def triplet_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(s_neg - s_pos + margin).sum()


def make_optimizer(net: nn.Module, lr: float, milestones: list[int]
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """SGD with the backbone at 0.1 * lr and the head at lr, then MultiStepLR (gamma 0.1)."""
    backbone = [p for n, p in net.named_parameters() if n.startswith("model.")]
    head = [p for n, p in net.named_parameters() if not n.startswith("model.")]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": 0.1 * lr}, {"params": head, "lr": lr}],
                                lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


def default_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """ft_net with ImageNet weights (torchvision's cache or --pretrained), or a trained ft_net checkpoint
    given as --pretrained (its head too when the class count matches), or random with --no_pretrained."""
    if args.pretrained and not args.no_pretrained:
        state = model_lib.load_checkpoint(args.pretrained) if _is_ft_net_file(args.pretrained) else None
        if state is not None:
            net = model_lib.ft_net(num_classes, args.network_arch)
            if model_lib.num_classes(state) != num_classes:  # another dataset: keep our new head
                state = {k: v for k, v in state.items() if not k.startswith("classifier.classifier.")}
            missing, _ = net.load_state_dict(state, strict=False)
            if any(not k.startswith("classifier.classifier.") for k in missing):
                raise model_lib.ModelError(f"{args.pretrained} does not fit {args.network_arch}")
            return net
    pretrained = False if args.no_pretrained else (args.pretrained or True)
    return model_lib.ft_net(num_classes, args.network_arch, pretrained=pretrained)


def _is_ft_net_file(path: str) -> bool:
    try:
        return "classifier.classifier.0.weight" in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # let the ImageNet loader report it


def train_one_epoch(net, loader, optimizer, scaler, device, args, epoch: int) -> dict:
    net.train()
    totals = {"loss": 0.0, "correct": 0, "margin": 0.0, "n": 0}
    amp = scaler is not None
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.Epochs}", leave=False, mininterval=1.0, disable=None)
    for imgs, labels, positives in bar:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        positives = positives.to(device, non_blocking=True).flatten(0, 1)
        with torch.autocast(device.type, enabled=amp):
            _, f = net(imgs)
            _, pf = net(positives)
        s_pos, s_neg = mine_triplets(f.float(), pf.float(), labels, args.poolsize)
        loss = triplet_loss(s_pos, s_neg, args.margin)
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            totals["loss"] += loss.item()
            totals["correct"] += int((s_pos > s_neg + args.margin).sum())
            totals["margin"] += float((s_pos - s_neg).sum())
            totals["n"] += len(labels)
        n = totals["n"]
        bar.set_postfix(loss=f"{totals['loss'] / n:.4f}", acc=f"{totals['correct'] / n:.3f}",
                        img_s=f"{n * (1 + data.NUM_POSITIVES) / (time.time() - t0):.0f}")
    n = max(totals["n"], 1)
    return {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n, "mean_margin": totals["margin"] / n,
            "seconds": time.time() - t0}


LOG_FIELDS = ["epoch", "loss", "accuracy", "mean_margin", "lr", "seconds", "note"]


def write_log(history: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    utils.write_text_atomic(buf.getvalue(), path)


def train(args: argparse.Namespace, make_hook: Callable[[nn.Module, argparse.Namespace], EpochEndHook] | None = None,
          build_model: Callable[[argparse.Namespace, int], nn.Module] = default_model,
          method: str = "baseline") -> nn.Module:
    """Train (and prune, through the hook) one run; returns the final model. `method` is recorded in
    opts.yaml (bafd, sfp, fpgm, hfp) for the tools that collect results."""
    model_lib.check_arch(args.network_arch)
    out = run_dir(args)
    resume_file = out / "resume.pth"
    if args.resume and not resume_file.is_file():
        raise DatasetError(f"--resume: {resume_file} does not exist")
    device = utils.select_device(args.gpu_ids)
    utils.seed_everything(args.seed)
    train_dir = Path(args.data_dir) / ("train_all" if args.train_all else "train")
    loader = data.train_loader(train_dir, args.batchsize, (args.height, args.width), args.workers,
                               args.erasing_p, args.color_jitter, pin_memory=device.type == "cuda")
    num_classes = len(loader.dataset.classes)
    net = build_model(args, num_classes).to(device)
    hook = make_hook(net, args) if make_hook else EpochEndHook()
    milestones = [int(m) for m in str(args.milestones).split(",") if m.strip()]
    optimizer, scheduler = make_optimizer(net, args.lr, milestones)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start, history = 1, []
    if args.resume:
        state = torch.load(resume_file, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        hook.load_state_dict(state["hook"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        utils.set_rng_state(state["rng"])
        start, history = state["epoch"] + 1, state["history"]
        print(f"resuming {out} after epoch {state['epoch']}")
    else:
        out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items()}
    options.update(nclasses=num_classes, arch=args.network_arch, method=method)
    utils.save_options(options, out / "opts.yaml")
    print(f"{args.network_arch}: {num_classes} classes, {len(loader.dataset)} images, device {device}, "
          f"outputs in {out}")

    for epoch in range(start, args.Epochs + 1):
        last = epoch == args.Epochs
        stats = train_one_epoch(net, loader, optimizer, scaler, device, args, epoch)
        lr = optimizer.param_groups[1]["lr"]
        scheduler.step()
        note = hook.on_epoch_end(net, epoch, last)
        history.append({"epoch": epoch, **stats, "lr": lr, "note": note})
        print(f"epoch {epoch}/{args.Epochs} loss {stats['loss']:.4f} acc {stats['accuracy']:.3f} "
              f"margin {stats['mean_margin']:.3f} lr {lr:.2e} {stats['seconds']:.1f}s {note}".rstrip(), flush=True)
        if epoch >= args.save_epoch or last:
            weights = hook.weights_to_save(net, epoch, last)
            if epoch >= args.save_epoch:
                utils.save_atomic(weights, out / f"net_{epoch}.pth")
            if last:
                utils.save_atomic(weights, out / "net_last.pth")
        resume = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "hook": hook.state_dict(), "rng": utils.rng_state(),
                  "epoch": epoch, "history": history}
        if scaler is not None:
            resume["scaler"] = scaler.state_dict()
        utils.save_atomic(resume, resume_file)
        write_log(history, out / "log.csv")
    return net
