"""The one training loop shared by APFP_train.py (BAFD), SFP_train.py, FPGM_train.py and L1_train.py.

A train script is its argument parser plus the choice of an epoch-end hook (the pruner) and, for HFP,
of the model it starts from. Everything else (data, mining, loss, optimiser, checkpoints, resume)
lives here and is read top to bottom in `train()`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

import model as model_lib
from toolkit import cli, data, distributed, utils
from toolkit import losses as losses_lib
from toolkit import run as scaffold
from toolkit.layouts import DatasetError


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


def add_training_args(parser: argparse.ArgumentParser, lr: float = 0.01,
                      help_overrides: dict[str, str] | None = None,
                      zero_epochs: bool = False) -> argparse.ArgumentParser:
    """The reference training flags shared by the four train scripts, plus our additions. A pipeline
    script that gives a flag another meaning passes its help text in help_overrides ({flag: text}),
    and zero_epochs=True where --Epochs 0 means "no training" (quantize.py)."""
    p = parser
    helps = help_overrides or {}
    p.add_argument("--gpu_ids", default="0", help="GPU id(s), e.g. 0; the CPU is used when CUDA is absent")
    p.add_argument("--name", default="ft_ResNet",
                   help=helps.get("--name", "run name: outputs go to RESULTS_DIR/ft_<arch>/<name>/"))
    p.add_argument("--data_dir", default="./datasets/Market/pytorch",
                   help="a prepared dataset's pytorch/ folder, or several comma-separated ones trained on together "
                        "(identities relabelled so that datasets never share a label)")
    p.add_argument("--train_all", action="store_true", help="train on train_all (train + val) instead of train")
    p.add_argument("--batchsize", type=cli.positive_int, default=32,
                   help="anchors per batch (each brings 4 positives)")
    p.add_argument("--lr", type=cli.positive_float, default=lr,
                   help="learning rate of the head; the backbone uses 0.1 * lr")
    p.add_argument("--Epochs", type=cli.nonnegative_int if zero_epochs else cli.positive_int, default=70,
                   help=helps.get("--Epochs", "number of training epochs"))
    p.add_argument("--milestones", type=cli.positive_int_list, default=[40, 60],
                   help="comma-separated epochs at which the learning rate is multiplied by 0.1")
    p.add_argument("--save_epoch", type=cli.positive_int, default=60,
                   help="save net_<epoch>.pth from this (1-based) epoch on; net_last.pth is always saved")
    p.add_argument("--network_arch", default="resnet50",
                   help=helps.get("--network_arch", "resnet18, resnet34 or resnet50"))
    p.add_argument("--prune_rate", type=cli.prune_fraction, default=0.9,
                   help=helps.get("--prune_rate", "fraction of filters removed"))
    p.add_argument("--erasing_p", type=cli.probability, default=0.0, help="random erasing probability (0 = off)")
    p.add_argument("--color_jitter", action="store_true", help="use colour jitter in training")
    p.add_argument("--poolsize", type=cli.positive_int, default=128,
                   help="hard negatives are mined among this many positives")
    p.add_argument("--margin", type=cli.nonnegative_float, default=0.3, help="triplet margin on cosine similarities")
    p.add_argument("--loss", default="triplet",
                   help="training loss: triplet (the paper), circle, softmax, or several joined by '+' "
                        "(e.g. softmax+circle); the total is their sum")
    p.add_argument("--circle_m", type=cli.nonnegative_float, default=0.25, help="circle loss relaxation margin m")
    p.add_argument("--circle_gamma", type=cli.positive_float, default=64.0, help="circle loss scale gamma")
    p.add_argument("--warm_epoch", type=cli.nonnegative_int, default=0,
                   help="linear learning-rate warm-up over the first N epochs, per step from 0.1 x lr (0 = off)")
    p.add_argument("--pretrained_dir", "--pretrained", dest="pretrained", default=None,
                   help=helps.get("--pretrained", "starting weights: a torchvision ImageNet state dict for the "
                                  "backbone, or a trained ft_net checkpoint (default: ImageNet weights from "
                                  "torchvision's local cache)"))
    p.add_argument("--no_pretrained", action="store_true",
                   help=helps.get("--no_pretrained", "train from random initialisation"))
    p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="random seed (data order, augmentation, mining, init)")
    p.add_argument("--resume", action="store_true",
                   help=helps.get("--resume", "continue RESULTS_DIR/ft_<arch>/<name>/ from resume.pth"))
    p.add_argument("--workers", type=cli.nonnegative_int, default=4, help="data-loading worker processes")
    p.add_argument("--height", type=cli.positive_int, default=256, help="input height (256 in the paper)")
    p.add_argument("--width", type=cli.positive_int, default=128, help="input width (128 in the paper)")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (ignored on the CPU)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format on CUDA")
    p.add_argument("--sync_bn", action="store_true",
                   help="under torchrun on GPUs: BN statistics over all ranks' batches (SyncBatchNorm)")
    p.add_argument("--results_dir", default="./results", help=helps.get("--results_dir", "root folder of all runs"))
    p.add_argument("--overwrite", action="store_true",
                   help=helps.get("--overwrite", "train into a run folder that already holds a run, replacing it "
                                  "(without it, that is an error: use --resume to continue the run)"))
    return p


# The flags that pipeline scripts (iterative_compress.py, quantize.py: from --checkpoint into --out) leave unused.
PIPELINE_UNUSED_FLAGS = {"--name": "not used (outputs go to --out)", "--results_dir": "not used (outputs go to --out)",
                         "--network_arch": "not used (read from the checkpoint)",
                         "--pretrained": "not used (--checkpoint gives the weights)", "--no_pretrained": "not used"}


TrainingError = scaffold.RunError  # the name the train scripts and pipeline scripts know


USER_ERRORS = (DatasetError, model_lib.ModelError, losses_lib.LossError, TrainingError)

# What defines a run: resuming with any of these different from the saved opts.yaml would silently
# continue another experiment than the command line says.
RESUME_MUST_MATCH = ("method", "network_arch", "prune_rate", "max_lrate", "knn", "decay_rate", "efficient_pruning",
                     "criterion", "loss", "height", "width", "train_all")
RUN_FILES = ("opts.yaml", "resume.pth", "log.csv", "net_*.pth")


def check_training_args(args: argparse.Namespace) -> None:
    """Flag combinations that would give another run than asked; the parser checked each flag alone."""
    if args.no_pretrained and args.pretrained:
        raise cli.UsageError("--no_pretrained and --pretrained contradict each other: give one")
    scaffold.check_run_flags(getattr(args, "resume", False), getattr(args, "overwrite", False))
    if getattr(args, "max_lrate", None) is not None and args.max_lrate < args.prune_rate:
        raise cli.UsageError(f"--max_lrate {args.max_lrate} is below --prune_rate {args.prune_rate}: no layer "
                             "allocation can reach the overall rate")


def check_run_folder(out: Path, args: argparse.Namespace, method: str) -> tuple[scaffold.RunFolder, dict]:
    """The run folder (an existing run needs --resume, then the same run, or --overwrite) and the saved
    options of the run to resume ({} otherwise)."""
    inputs = [getattr(args, "pretrained", None), *str(args.data_dir).split(",")]
    folder = scaffold.RunFolder(out, resume=args.resume, overwrite=getattr(args, "overwrite", False),
                                markers=RUN_FILES, elsewhere="choose another --name", inputs=inputs)
    if not args.resume:
        return folder, {}
    opts_file = out / "opts.yaml"
    try:
        saved = utils.load_options(opts_file)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise TrainingError(f"--resume: cannot read {opts_file} ({type(e).__name__})") from None
    scaffold.check_same_run(saved, {**vars(args), "method": method}, out, RESUME_MUST_MATCH)
    return folder, saved


def check_resume_classes(out: Path, saved: int | None, num_classes: int, data_dir: str) -> None:
    if saved is not None and saved != num_classes:
        raise TrainingError(f"--resume: {out} was trained on {saved} identities, {data_dir} has {num_classes}: "
                            "another dataset (or split) than the run's")


KIND = "the re-ID train scripts"
RESUME_KEYS = ("model", "optimizer", "scheduler", "hook", "rng", "mining_rng", "epoch", "history")


def run_dir(args: argparse.Namespace) -> Path:
    """RESULTS_DIR/ft_<arch>/<name>, or args.out_dir where a pipeline script sets one."""
    if getattr(args, "out_dir", None):
        return Path(args.out_dir)
    return Path(args.results_dir) / f"ft_{args.network_arch}" / args.name


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
        state = _ft_net_state(args.pretrained)
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


def fit_classifier(net: nn.Module, num_classes: int) -> nn.Module:
    """`net` with a fresh classifier Linear when its class count differs from the training set's
    (fine-tuning a trained or small model on other or merged data); returns `net`."""
    old = net.classifier.classifier[0]
    if old.out_features != num_classes:
        new = nn.Linear(old.in_features, num_classes).to(old.weight.device)
        nn.init.normal_(new.weight, std=0.001)
        nn.init.zeros_(new.bias)
        net.classifier.classifier[0] = new
    return net


def _ft_net_state(path: str) -> dict | None:
    """The file's state dict when it is an ft_net checkpoint, else None (the ImageNet loader reports
    a missing or unreadable file)."""
    try:
        return model_lib.load_checkpoint(path)
    except model_lib.ModelError:
        return None


class PairForward(nn.Module):
    """Anchors and positives through the network in two passes (BN statistics per pass, as in the
    reference) inside one forward, so that DistributedDataParallel sees one forward per backward.
    Returns (anchor features, positive features, anchor logits, positive logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, imgs: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, f = self.net(imgs)
        plogits, pf = self.net(positives)
        return f, pf, logits, plogits


def batch_loss(pair: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor,
               args: argparse.Namespace, generator: torch.Generator, autocast: bool = False
               ) -> tuple[torch.Tensor, dict]:
    """Forward and losses of one batch: (the loss of --loss, detached stats)."""
    with torch.autocast(imgs.device.type, enabled=autocast):
        f, pf, logits, plogits = pair(imgs, positives)
    return losses_lib.batch_loss(losses_lib.parse_losses(args.loss), f.float(), pf.float(), logits.float(),
                                 plogits.float(), labels, args.margin, args.poolsize, generator, args.circle_m,
                                 args.circle_gamma)


def loss_and_backward(pair: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor,
                      args: argparse.Namespace, generator: torch.Generator, scaler=None
                      ) -> tuple[torch.Tensor, dict]:
    """Forward, losses and backward of one batch; returns (this rank's loss, detached stats).

    Each rank's loss is its share of the global batch's loss and DDP averages gradients over ranks, so
    the loss is scaled by the world size: N ranks x batch B give the gradients of 1 process x batch N*B."""
    loss, stats = batch_loss(pair, imgs, labels, positives, args, generator, autocast=scaler is not None)
    scaled = loss * distributed.world_size()
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach(), stats


def warmup_factor(step: int, warm_steps: int) -> float:
    """Learning-rate factor at global step `step` (0-based): 0.1 rising linearly to 1 over warm_steps."""
    return 1.0 if step >= warm_steps else 0.1 + 0.9 * step / warm_steps


def train_one_epoch(pair, loader, optimizer, scaler, device, args, epoch: int, generator) -> dict:
    """One epoch; returns the mean batch loss, the fraction of anchors whose mined triplet satisfies the
    margin, their mean s_pos - s_neg, the identity accuracy (softmax loss only) and the time taken."""
    pair.train()
    loader.sampler.set_epoch(epoch)
    totals = torch.zeros(6, dtype=torch.float64)  # loss, correct, margin, anchors, id correct, batches
    scheduled = [group["lr"] for group in optimizer.param_groups]
    warm_steps = args.warm_epoch * len(loader)
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.Epochs}", leave=False, mininterval=1.0,
               disable=None if distributed.is_main() else True)
    for step, (imgs, labels, positives) in enumerate(bar, (epoch - 1) * len(loader)):
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        positives = positives.to(device, non_blocking=True).flatten(0, 1)
        if args.channels_last and device.type == "cuda":
            imgs, positives = (x.contiguous(memory_format=torch.channels_last) for x in (imgs, positives))
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr * warmup_factor(step, warm_steps)
        optimizer.zero_grad(set_to_none=True)
        loss, stats = loss_and_backward(pair, imgs, labels, positives, args, generator, scaler)
        loss_value = loss.item()
        in_epoch = step - (epoch - 1) * len(loader) + 1
        scaffold.check_finite_loss(loss_value, f"epoch {epoch}, step {in_epoch}/{len(loader)}")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        s_pos, s_neg = stats["s_pos"], stats["s_neg"]
        totals += torch.tensor([loss_value, float((s_pos > s_neg + args.margin).sum()),
                                float((s_pos - s_neg).sum()), len(labels), float(stats.get("id_correct", 0)), 1],
                               dtype=torch.float64)
        n = totals[3].item()
        bar.set_postfix(loss=f"{totals[0].item() / totals[5].item():.4f}", acc=f"{totals[1].item() / n:.3f}",
                        img_s=f"{n * (1 + data.NUM_POSITIVES) / (time.time() - t0):.0f}")
    for group, lr in zip(optimizer.param_groups, scheduled):  # the epoch scheduler steps from its own values
        group["lr"] = lr
    loss, correct, margin, n, id_correct, batches = distributed.sum_over_ranks(totals.tolist(), device)
    n = max(n, 1)
    world = distributed.world_size()
    result = {"loss": loss / max(batches / world, 1), "accuracy": correct / n, "mean_margin": margin / n,
              "seconds": time.time() - t0}
    if "softmax" in losses_lib.parse_losses(args.loss):
        result["id_accuracy"] = id_correct / (n * (1 + data.NUM_POSITIVES))
    return result


LOG_FIELDS = ["epoch", "loss", "accuracy", "mean_margin", "id_accuracy", "lr", "seconds", "note"]


def write_log(history: list[dict], path: Path) -> None:
    utils.write_csv_atomic(history, LOG_FIELDS, path)


def wrap_for_training(net: nn.Module, device: torch.device, args: argparse.Namespace) -> nn.Module:
    """PairForward around the network; under torchrun also SyncBatchNorm (--sync_bn) and DDP.

    The unused torchvision fc, and the classifier Linear unless the softmax loss trains it, get no
    gradient; they are frozen explicitly, which DDP requires and changes nothing else."""
    softmax = "softmax" in losses_lib.parse_losses(args.loss)
    frozen = ("model.fc.",) if softmax else ("model.fc.", "classifier.classifier.")
    for name, p in net.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
    if args.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    pair = PairForward(net)
    if distributed.world_size() == 1:
        return pair
    if args.sync_bn and device.type == "cuda":
        pair = nn.SyncBatchNorm.convert_sync_batchnorm(pair)
    return nn.parallel.DistributedDataParallel(pair, device_ids=[device] if device.type == "cuda" else None)


def train(args: argparse.Namespace, make_hook: Callable[[nn.Module, argparse.Namespace], EpochEndHook] | None = None,
          build_model: Callable[[argparse.Namespace, int], nn.Module] = default_model,
          method: str = "baseline", method_row: dict | None = None) -> nn.Module:
    """Train (and prune, through the hook) one run; returns the final model. `method` is recorded in
    opts.yaml (bafd, sfp, fpgm, hfp) for the tools that collect results.

    Under torchrun every rank trains its share of each global batch; the epoch-end hook runs on rank 0,
    whose weights and masks are then broadcast; only rank 0 writes files and prints."""
    model_lib.check_arch(args.network_arch)
    losses_lib.parse_losses(args.loss)
    check_training_args(args)
    out = run_dir(args)
    folder, saved = check_run_folder(out, args, method)
    resume_state = scaffold.load_resume(folder.resume_file, KIND, RESUME_KEYS) if args.resume else None
    device = distributed.setup(args.gpu_ids)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    utils.seed_everything(args.seed + rank)  # augmentation differs per rank; the model init is broadcast
    train_dirs = data.training_dirs(args.data_dir, args.train_all)
    if args.resume:
        check_resume_classes(out, saved.get("nclasses"), len(data.scan_sources(train_dirs)[0]), args.data_dir)
    loader = data.train_loader(train_dirs, args.batchsize, (args.height, args.width), args.workers,
                               args.erasing_p, args.color_jitter, pin_memory=device.type == "cuda",
                               seed=args.seed, rank=rank, world=world)
    num_classes = len(loader.dataset.classes)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    net = build_model(args, num_classes).to(device)
    hook = make_hook(net, args) if make_hook else EpochEndHook()
    distributed.broadcast_module(net)
    hook.load_state_dict(distributed.broadcast_object(hook.state_dict()))
    torch.manual_seed(args.seed + rank)
    pair = wrap_for_training(net, device, args)
    optimizer, scheduler = make_optimizer(net, args.lr, args.milestones)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    mining = torch.Generator().manual_seed(args.seed)  # the same pool draws on every rank
    start, history = 1, []
    if resume_state is not None:
        state = resume_state
        try:
            net.load_state_dict(state["model"])
        except RuntimeError:
            raise TrainingError(f"--resume: {folder.resume_file} does not fit {args.network_arch}: "
                                f"{scaffold.state_dict_mismatch(net, state['model'])}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        hook.load_state_dict(state["hook"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        scaffold.restore_rng(state["rng"])
        mining.set_state(state["mining_rng"])
        start, history = state["epoch"] + 1, state["history"]
        if main:
            print(f"resuming {out} after epoch {state['epoch']}")
    options = {**vars(args), "nclasses": num_classes, "arch": args.network_arch, "method": method,
               "world_size": world, **({"method_row": method_row} if method_row else {})}
    if main:
        if len(train_dirs) > 1:
            for source in loader.dataset.sources:
                print(f"  {source['source']}: {source['ids']} ids, {source['images']} images")
            print(f"  merged: {data.describe_sources(loader.dataset.sources)}")
        print(f"{args.network_arch}: {num_classes} classes, {len(loader.dataset)} images, device {device}"
              f"{f' x {world} processes' if world > 1 else ''}, outputs in {out}")
    folder.start()
    try:
        for epoch in range(start, args.Epochs + 1):
            train_epoch(epoch, pair, net, hook, loader, optimizer, scheduler, scaler, device, args, mining, history,
                        options, folder, start)
    except BaseException:
        folder.discard()
        raise
    distributed.cleanup()
    return net


def train_epoch(epoch: int, pair, net, hook, loader, optimizer, scheduler, scaler, device, args, mining,
                history: list[dict], options: dict, folder: scaffold.RunFolder, start: int) -> None:
    """One epoch, the hook, and rank 0's files: the checkpoints, resume.pth, log.csv, opts.yaml."""
    main, last = distributed.is_main(), epoch == args.Epochs
    stats = train_one_epoch(pair, loader, optimizer, scaler, device, args, epoch, mining)
    lr = optimizer.param_groups[1]["lr"]
    scheduler.step()
    scaffold.check_finite_weights(net, f"epoch {epoch}")
    note = hook.on_epoch_end(net, epoch, last) if main else ""
    distributed.broadcast_module(net)  # rank 0's pruned weights everywhere
    hook.load_state_dict(distributed.broadcast_object(hook.state_dict()))
    rng = scaffold.gather_rng()
    if not main:
        return
    history.append({"epoch": epoch, **stats, "lr": lr, "note": note})
    id_acc = f"id_acc {stats['id_accuracy']:.3f} " if "id_accuracy" in stats else ""
    print(f"epoch {epoch}/{args.Epochs} loss {stats['loss']:.4f} acc {stats['accuracy']:.3f} {id_acc}"
          f"margin {stats['mean_margin']:.3f} lr {lr:.2e} {stats['seconds']:.1f}s {note}".rstrip(), flush=True)
    out = folder.path
    if epoch == start:  # opts.yaml comes with the first checkpoint: it marks the folder as holding a run
        utils.save_options(options, out / "opts.yaml")
    if epoch >= args.save_epoch or last:
        weights = hook.weights_to_save(net, epoch, last)
        if epoch >= args.save_epoch:
            scaffold.save_checkpoint(weights, out / f"net_{epoch}.pth")
        if last:
            scaffold.save_checkpoint(weights, out / "net_last.pth")
    resume = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "hook": hook.state_dict(), "rng": rng, "mining_rng": mining.get_state(), "epoch": epoch,
              "history": history}
    if scaler is not None:
        resume["scaler"] = scaler.state_dict()
    scaffold.save_resume(resume, out / "resume.pth", KIND)
    write_log(history, out / "log.csv")
    folder.commit()
