"""Train a TransReID ViT (ID + triplet loss, SGD, warm-up + cosine); alone or under torchrun.

    python -m transreid.train --config_file transreid/configs/Market/vit_transreid_stride.yml \\
        MODEL.DEVICE_ID "('0')" DATASETS.ROOT_DIR "('./data')"
    torchrun --nproc_per_node 4 -m transreid.train --config_file ... MODEL.DIST_TRAIN True
"""
from __future__ import annotations

import argparse

import torch

from toolkit import cli, distributed, utils
from toolkit import run as scaffold
from toolkit.layouts import DatasetError
from transreid import processor
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.datasets import make_test_loader, make_train_loader, read_dataset
from transreid.loss import make_loss
from transreid.model import (
    ModelError,
    checkpoint,
    load_imagenet_vit,
    load_reid_weights,
    make_model,
    read_imagenet_vit,
    read_reid_checkpoint,
)
from transreid.solver import make_optimizer, set_epoch_lr


def read_start_weights(cfg) -> dict | None:
    """MODEL.PRETRAIN_PATH as MODEL.PRETRAIN_CHOICE says (read before any other work: a wrong file stops
    the run at once)."""
    choice, path = cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH
    if choice != "none" and not path:
        raise ConfigError("MODEL.PRETRAIN_PATH is empty: give the ImageNet ViT file (nothing is downloaded), "
                          "or set MODEL.PRETRAIN_CHOICE 'none' to train from random weights")
    if choice == "imagenet":
        return read_imagenet_vit(path)
    return read_reid_checkpoint(path, "MODEL.PRETRAIN_PATH") if choice == "self" else None


def build_model(cfg, num_classes: int, camera_num: int, start: dict | None, log_to,
                resuming: bool = False) -> torch.nn.Module:
    """The configured model with read_start_weights' weights (None on --resume, which loads its own)."""
    model = make_model(cfg, num_classes, camera_num)
    choice, path = cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH
    if resuming:
        return model
    if choice == "none":
        processor.log(log_to, "note: MODEL.PRETRAIN_CHOICE 'none': training from random weights")
    elif start is not None and choice == "imagenet":
        processor.log(log_to, f"loaded {load_imagenet_vit(model, start, path)} ImageNet tensors from {path}")
    elif start is not None:
        load_reid_weights(model, start, path)
    return model


RESUME_KEYS = ("model", "optimizer", "epoch", "rng", "history")
KIND = "transreid.train"


def main(args: argparse.Namespace) -> dict:
    scaffold.check_run_flags(args.resume, args.overwrite)
    cfg = load_config(args.config_file, args.opts)
    folder = processor.run_folder(cfg, args.resume, args.overwrite, [cfg.MODEL.PRETRAIN_PATH])
    resume = scaffold.load_resume(folder.resume_file, KIND, RESUME_KEYS) if args.resume else None
    start_weights = None if resume else read_start_weights(cfg)
    device = processor.select_device(cfg)
    rank, world = distributed.rank(), distributed.world_size()
    utils.seed_everything(cfg.SOLVER.SEED + rank)
    splits = read_dataset(cfg)
    train_loader = make_train_loader(cfg, splits, rank, world)
    test_loader = make_test_loader(cfg, splits, rank, world)
    torch.manual_seed(cfg.SOLVER.SEED)  # the same initial model on every rank
    model = build_model(cfg, splits.num_classes, splits.camera_num, start_weights, folder, resume is not None)
    model = model.to(device)
    optimizer = make_optimizer(cfg, model)
    start, history = 1, []
    if resume is not None:
        load_resume_model(model, resume, folder.resume_file)
        optimizer.load_state_dict(resume["optimizer"])
        scaffold.restore_rng(resume["rng"])  # one state per rank of the interrupted run
        start, history = resume["epoch"] + 1, resume["history"]
    distributed.broadcast_module(model)
    net = processor.wrap(model, device)
    loss_fn = make_loss(cfg)
    s = cfg.SOLVER
    processor.log(folder, f"{splits.num_classes} training ids, {len(splits.train)} images, {splits.camera_num} "
                          f"cameras; {world} process(es) x {s.IMS_PER_BATCH // world} images per step on {device}")
    folder.start()
    try:
        for epoch in range(start, s.MAX_EPOCHS + 1):
            train_epoch(cfg, epoch, net, model, optimizer, loss_fn, train_loader, test_loader, len(splits.query),
                        device, folder, history)
            if epoch == args.stop_after_epoch:
                processor.log(folder, f"stopped after epoch {epoch} (--stop_after_epoch); continue with --resume")
                break
    except BaseException:
        folder.discard()
        raise
    distributed.cleanup()
    return history[-1] if history else {}


def load_resume_model(model: torch.nn.Module, resume: dict, path) -> None:
    try:
        model.load_state_dict(resume["model"]["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        detail = (scaffold.state_dict_mismatch(model, resume["model"]["state_dict"]) if isinstance(e, RuntimeError)
                  else f"{type(e).__name__}: {e}")
        raise processor.RunError(f"--resume: {path} does not fit the configured model: {detail}") from None


def train_epoch(cfg, epoch: int, net, model, optimizer, loss_fn, train_loader, test_loader, num_query: int, device,
                folder, history: list[dict]) -> None:
    """One epoch, its evaluation when due, then rank 0's files (transformer_<epoch>.pth, resume.pth, config)."""
    s = cfg.SOLVER
    lr = set_epoch_lr(optimizer, epoch, s.BASE_LR, s.MAX_EPOCHS, s.WARMUP_EPOCHS)
    stats = processor.train_one_epoch(net, train_loader, optimizer, loss_fn, device, epoch, s.MAX_EPOCHS)
    scaffold.check_finite_weights(model, f"epoch {epoch}")
    record = {"epoch": epoch, "lr": lr, **stats}
    if epoch % s.EVAL_PERIOD == 0 or epoch == s.MAX_EPOCHS:
        record.update(processor.test_model(cfg, model, test_loader, num_query, device)[0])
    history.append(record)
    line = f"epoch {epoch}/{s.MAX_EPOCHS}  loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  lr {lr:.2e}  " \
           f"{stats['seconds']:.1f}s"
    processor.log(folder, line + (f"  {processor.format_metrics(record)}" if "mAP" in record else ""))
    rng = scaffold.gather_rng()
    if not distributed.is_main():
        return
    out = folder.path
    processor.save_config(cfg, out)
    ckpt = checkpoint(model, epoch=epoch)
    if epoch % s.CHECKPOINT_PERIOD == 0 or epoch == s.MAX_EPOCHS:
        scaffold.save_checkpoint(ckpt, out / f"transformer_{epoch}.pth")
    scaffold.save_resume({"model": ckpt, "optimizer": optimizer.state_dict(), "epoch": epoch, "rng": rng,
                         "history": history}, out / "resume.pth", KIND)
    folder.commit()


def get_parser() -> argparse.ArgumentParser:
    p = get_args_parser(__doc__.splitlines()[0])
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR from its resume.pth")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUTPUT_DIR")
    p.add_argument("--stop_after_epoch", type=cli.positive_int, default=None,
                   help="stop after this epoch as if interrupted (a time-limited job slice); --resume continues")
    return p


if __name__ == "__main__":
    cli.run_main(main, get_parser().parse_intermixed_args(),
                 (ConfigError, DatasetError, ModelError, processor.RunError))
