"""The pieces train.py, test.py and finetune.py share: device and run folder, one training epoch,
feature extraction and evaluation (the project's evaluator), checkpoints and the per-epoch log."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from toolkit import distributed, utils
from toolkit.ranking import EvaluationError, evaluate
from toolkit.run import RunError, RunFolder, check_same_run  # noqa: F401  (RunError: the scripts' name)
from transreid.config import ConfigError

# keys that may differ between a run and its --resume (where it runs and what it reports, not what it computes)
RESUME_FREE = ("OUTPUT_DIR", "MODEL.DEVICE", "MODEL.DEVICE_ID", "DATALOADER.NUM_WORKERS", "TEST.", "SOLVER.LOG_PERIOD")
PATH_KEYS = ("DATASETS.ROOT_DIR", "MODEL.PRETRAIN_PATH", "FINETUNE.PRETRAIN_PATH")

def select_device(cfg) -> torch.device:
    """This process's device; under torchrun (MODEL.DIST_TRAIN True) also the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.MODEL.DIST_TRAIN:
        raise ConfigError("launched by torchrun: add MODEL.DIST_TRAIN True (otherwise every process would "
                          "train alone and write the same files)")
    return distributed.setup(cfg.MODEL.DEVICE_ID if cfg.MODEL.DEVICE == "cuda" else "-1")


def flat_config(cfg, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_folder(cfg, resume: bool, overwrite: bool, inputs: list[str]) -> RunFolder:
    """OUTPUT_DIR, checked (nothing is created yet): another run there needs --overwrite, and --resume must
    continue the same configuration (every key but RESUME_FREE, paths resolved)."""
    out = Path(cfg.OUTPUT_DIR)
    folder = RunFolder(out, resume=resume, overwrite=overwrite, markers=("config.yaml", "resume.pth"),
                       elsewhere="set another OUTPUT_DIR", inputs=[cfg.DATASETS.ROOT_DIR, *inputs])
    if resume:
        saved_file = out / "config.yaml"
        if not saved_file.is_file():
            raise RunError(f"--resume: {saved_file} does not exist (the run's configuration)")
        try:
            saved = flat_config(utils.load_options(saved_file))
        except Exception as e:  # an unreadable or hand-edited file
            raise RunError(f"--resume: cannot read {saved_file} ({type(e).__name__})") from None
        check_same_run(saved, flat_config(cfg), out, free=RESUME_FREE, path_keys=PATH_KEYS)
    return folder


def save_config(cfg, out: Path) -> None:
    """OUTPUT_DIR/config.yaml: marks the folder as holding a run and is what --resume compares against."""
    utils.write_text_atomic(cfg.dump(), out / "config.yaml")


def check_checkpoint_fits(ckpt: dict, splits, path, what: str, classes: bool) -> None:
    """The dataset's cameras (SIE) and, when the classifier is used, its ids must fit the checkpoint."""
    if ckpt["camera_num"] and splits.camera_num > ckpt["camera_num"]:
        raise RunError(f"{what} {path} has a camera embedding for {ckpt['camera_num']} cameras, the dataset has "
                       f"{splits.camera_num}")
    if classes and ckpt["num_classes"] != splits.num_classes:
        raise RunError(f"{what} {path} was trained on {ckpt['num_classes']} ids, the dataset has "
                       f"{splits.num_classes} training ids")


def log(folder: RunFolder | None, line: str) -> None:
    """Print and append to the run's log.txt (rank 0 only)."""
    if not distributed.is_main():
        return
    print(line, flush=True)
    if folder is not None:
        folder.append("log.txt", line)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if distributed.world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=False)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer | None, loss_fn: Callable,
                    device: torch.device, epoch: int, epochs: int, extra_loss: Callable | None = None,
                    desc: str = "epoch") -> dict:
    """One pass over `loader`: forward, loss (+ extra_loss(imgs, cams, logits)), backward, and an optimiser
    step; optimizer None for AMG's scoring epochs (backward only: their hooks read the attention gradients)."""
    model.train()
    loader.sampler.set_epoch(epoch)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    total, correct, seen, batches, t0 = 0.0, 0, 0, 0, time.time()
    bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", leave=False, mininterval=1.0,
               disable=None if distributed.is_main() else True)
    for imgs, pids, cams in bar:
        imgs, pids, cams = imgs.to(device), pids.to(device), cams.to(device)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=scaler is not None):
            logits, feats = model(imgs, cams)
            loss = loss_fn(logits, feats, pids)
            if extra_loss is not None:
                loss = loss + extra_loss(imgs, cams, logits)
        value = loss.item()
        if not math.isfinite(value):
            raise RunError(f"the loss is {value} at {desc} {epoch}, step {batches + 1}/{len(loader)}: training "
                           "diverged (try a lower SOLVER.BASE_LR); this epoch was not saved")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        total += value
        batches += 1
        correct += int((logits[0].argmax(1) == pids).sum())
        seen += len(pids)
        bar.set_postfix(loss=f"{total / batches:.3f}", acc=f"{correct / seen:.3f}")
    total, correct, seen, batches = distributed.sum_over_ranks([total, correct, seen, batches], device)
    return {"loss": total / max(batches, 1), "acc": correct / max(seen, 1), "seconds": time.time() - t0}


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, person ids, cameras) of the loader's images, all ranks' shares put back in order."""
    model.eval()
    feats, pids, cams = [], [], []
    for imgs, pid, cam in tqdm(loader, desc="features", leave=False, mininterval=1.0,
                               disable=None if distributed.is_main() else True):
        feats.append(model(imgs.to(device), cam.to(device)).float().cpu())
        pids.append(pid)
        cams.append(cam)
    local = (torch.cat(feats).numpy(), torch.cat(pids).numpy(), torch.cat(cams).numpy())
    world = distributed.world_size()
    if world == 1:
        return local
    shares = distributed.all_gather_object(local)
    n = sum(len(s[0]) for s in shares)
    out = [np.empty((n,) + s.shape[1:], s.dtype) for s in local]
    for r, share in enumerate(shares):
        for dst, src in zip(out, share):
            dst[r::world] = src  # rank r took images r, r + world, ...
    return tuple(out)


def euclidean_scoring(qf: np.ndarray, gf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features whose dot product ranks like -Euclidean distance: q'.g' = 2 q.g - |g|^2 = |q|^2 - d^2."""
    return (np.hstack([qf, np.ones((len(qf), 1), qf.dtype)]),
            np.hstack([2 * gf, -(gf ** 2).sum(1, keepdims=True)]))


def scoring_features(feats: np.ndarray, num_query: int, feat_norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(query, gallery) features for the project's evaluator, which ranks by dot product: L2-normalised
    (FEAT_NORM yes, where the dot product ranks like the Euclidean distance), else the Euclidean form."""
    if not np.isfinite(feats).all():
        raise RunError("the model produced NaN or infinite features; nothing is scored")
    if feat_norm:
        feats = F.normalize(torch.from_numpy(feats), dim=1).numpy()
        return feats[:num_query], feats[num_query:]
    return euclidean_scoring(feats[:num_query].astype(np.float64), feats[num_query:].astype(np.float64))


def score_features(cfg, feats: np.ndarray, pids: np.ndarray, cams: np.ndarray, num_query: int,
                   rerank: bool = False) -> tuple[dict, tuple]:
    """Standard-protocol R1/R5/R10/mAP/mINP of query-then-gallery features, and the arrays that were scored.
    With rerank, the ranking is TransReID's k-reciprocal re-ranking of the (FEAT_NORM-normalised) features:
    squared Euclidean base distance, its evaluator's k1, k2 and lambda, float32 throughout."""
    feat_norm = cfg.TEST.FEAT_NORM == "yes"
    qf, gf = scoring_features(feats, num_query, feat_norm)
    arrays = (qf, pids[:num_query], cams[:num_query], gf, pids[num_query:], cams[num_query:])
    if not rerank:
        return evaluate(*arrays, protocol="standard"), arrays
    from toolkit.rerank import TRANSREID_PARAMS, evaluate_reranked
    raw_q, raw_g = (qf, gf) if feat_norm else (feats[:num_query], feats[num_query:])  # not the Euclidean form
    try:
        metrics = evaluate_reranked(raw_q, arrays[1], arrays[2], raw_g, arrays[4], arrays[5], TRANSREID_PARAMS)
    except EvaluationError as e:
        raise RunError(f"TEST.RE_RANKING: {e}") from None
    return metrics["standard"], arrays


def test_model(cfg, model: nn.Module, loader, num_query: int, device: torch.device,
               rerank: bool = False) -> tuple[dict, tuple]:
    """`score_features` of the loader's images (see there)."""
    return score_features(cfg, *extract_features(model, loader, device), num_query, rerank)


def format_metrics(m: dict) -> str:
    return (f"mAP {100 * m['mAP']:.1f}  R1 {100 * m['rank1']:.1f}  R5 {100 * m['rank5']:.1f}  "
            f"R10 {100 * m['rank10']:.1f}  mINP {100 * m['mINP']:.1f}")
