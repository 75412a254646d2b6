"""Train a TransReID ViT (ID + triplet loss, SGD, warm-up + cosine); alone or under torchrun.

    python -m transreid.train --config_file transreid/configs/Market/vit_transreid_stride.yml \\
        MODEL.DEVICE_ID "('0')" DATASETS.ROOT_DIR "('./data')"
    torchrun --nproc_per_node 4 -m transreid.train --config_file ... MODEL.DIST_TRAIN True
"""
from __future__ import annotations

import argparse

import torch

import cli
import distributed
import utils
from dataset_layout import DatasetError
from model import load_checkpoint
from transreid import processor
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.datasets import make_test_loader, make_train_loader, read_dataset
from transreid.loss import make_loss
from transreid.model import (ModelError, checkpoint, load_imagenet_vit, load_reid_weights, make_model,
                             read_imagenet_vit, read_reid_checkpoint)
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


def build_model(cfg, num_classes: int, camera_num: int, start: dict | None, log_to) -> torch.nn.Module:
    """The configured model with read_start_weights' weights (None on --resume, which loads its own)."""
    model = make_model(cfg, num_classes, camera_num)
    choice, path = cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH
    if choice == "none":
        processor.log(log_to, "note: MODEL.PRETRAIN_CHOICE 'none': training from random weights")
    elif start is not None and choice == "imagenet":
        processor.log(log_to, f"loaded {load_imagenet_vit(model, start, path)} ImageNet tensors from {path}")
    elif start is not None:
        load_reid_weights(model, start, path)
    return model


def main(args: argparse.Namespace) -> dict:
    processor.check_run_flags(args.resume, args.overwrite)
    cfg = load_config(args.config_file, args.opts)
    out = processor.prepare_run_folder(cfg, args.resume, args.overwrite)
    resume = load_checkpoint(out / "resume.pth", "model", "a resume file of this package", "resume file") \
        if args.resume else None
    start_weights = None if resume else read_start_weights(cfg)
    device = processor.select_device(cfg)
    rank, world = distributed.rank(), distributed.world_size()
    utils.seed_everything(cfg.SOLVER.SEED + rank)
    splits = read_dataset(cfg)
    train_loader = make_train_loader(cfg, splits, rank, world)
    test_loader = make_test_loader(cfg, splits, rank, world)
    torch.manual_seed(cfg.SOLVER.SEED)  # the same initial model on every rank
    model = build_model(cfg, splits.num_classes, splits.camera_num, start_weights, out).to(device)
    optimizer = make_optimizer(cfg, model)
    start, history = 1, []
    if resume is not None:
        model.load_state_dict(resume["model"]["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        rng = resume["rng"]  # one state per rank of the interrupted run
        utils.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        start, history = resume["epoch"] + 1, resume["history"]
    distributed.broadcast_module(model)
    net = processor.wrap(model, device)
    loss_fn = make_loss(cfg)
    s = cfg.SOLVER
    processor.log(out, f"{splits.num_classes} training ids, {len(splits.train)} images, {splits.camera_num} cameras; "
                       f"{world} process(es) x {s.IMS_PER_BATCH // world} images per step on {device}")
    for epoch in range(start, s.MAX_EPOCHS + 1):
        lr = set_epoch_lr(optimizer, epoch, s.BASE_LR, s.MAX_EPOCHS, s.WARMUP_EPOCHS)
        stats = processor.train_one_epoch(net, train_loader, optimizer, loss_fn, device, epoch, s.MAX_EPOCHS)
        processor.check_finite(model, f"epoch {epoch}")
        record = {"epoch": epoch, "lr": lr, **stats}
        if epoch % s.EVAL_PERIOD == 0 or epoch == s.MAX_EPOCHS:
            record.update(processor.test_model(cfg, model, test_loader, len(splits.query), device)[0])
        history.append(record)
        line = f"epoch {epoch}/{s.MAX_EPOCHS}  loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  lr {lr:.2e}  " \
               f"{stats['seconds']:.1f}s"
        processor.log(out, line + (f"  {processor.format_metrics(record)}" if "mAP" in record else ""))
        rng = distributed.all_gather_object(utils.rng_state())
        if distributed.is_main():
            processor.save_config(cfg, out)
            ckpt = checkpoint(model, epoch=epoch)
            if epoch % s.CHECKPOINT_PERIOD == 0 or epoch == s.MAX_EPOCHS:
                utils.save_atomic(ckpt, out / f"transformer_{epoch}.pth")
            utils.save_atomic({"model": ckpt, "optimizer": optimizer.state_dict(), "epoch": epoch,
                               "rng": rng, "history": history}, out / "resume.pth")
        if epoch == args.stop_after_epoch:
            processor.log(out, f"stopped after epoch {epoch} (--stop_after_epoch); continue with --resume")
            break
    distributed.cleanup()
    return history[-1] if history else {}


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
