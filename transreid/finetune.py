"""AMG: prune a trained TransReID's tokens or heads and fine-tune it with distillation from the unpruned model.

PRUNE_MODE attn removes tokens; head_entropy, head (given ranks) and random remove heads.

    python -m transreid.finetune --config_file transreid/configs/Market/vit_transreid_stride_attn.yml
    python -m transreid.finetune --config_file transreid/configs/Market/vit_transreid_stride_head.yml \\
        FINETUNE.PRETRAIN_PATH './logs/market_attn/best.pth'

Schedule: ITER_NUM rounds of (one scoring epoch with no optimiser step, pruning, a new optimiser, FINE_NUM
epochs), then FINAL_NUM epochs evaluated every SOLVER.EVAL_PERIOD. The learning rate follows TransReID's
warm-up + cosine over all fine-tuning epochs across the new optimisers (the reference's scheduler stays
bound to the first optimiser, so its later rounds run at a constant BASE_LR). Heads and tokens are two
runs: the second starts from the first's checkpoint. best.pth is the epoch with the highest mAP ON THE
TEST SET, as the reference chooses it (a validation split would be the honest choice); last.pth the end.
"""
from __future__ import annotations

import argparse

import torch

from toolkit import cli, distributed, utils
from toolkit import run as scaffold
from toolkit.layouts import DatasetError
from transreid import amg, processor
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.datasets import make_test_loader, make_train_loader, read_dataset
from transreid.loss import distillation_loss, make_loss
from transreid.model import ModelError, checkpoint, model_from_checkpoint, read_reid_checkpoint
from transreid.solver import make_optimizer, set_epoch_lr


def schedule(cfg) -> list[tuple[str, int]]:
    """[("prune", round), ("tune", epoch), ...]: the whole run as steps, so --resume can restart at any one."""
    f, steps, epoch = cfg.FINETUNE, [], 0
    for r in range(f.ITER_NUM):
        steps.append(("prune", r))
        for _ in range(f.FINE_NUM):
            epoch += 1
            steps.append(("tune", epoch))
    for _ in range(f.FINAL_NUM):
        epoch += 1
        steps.append(("tune", epoch))
    return steps


def cost_line(model, input_size) -> str:
    """Per layer kept tokens and heads, AMG's GFLOPs (comparable with the paper) and measured MACs."""
    measured = utils.count_macs(model, tuple(input_size))
    return (f"tokens per layer (CLS included) {model.tokens_per_layer()}, heads per layer "
            f"{[b.attn.heads for b in model.prunable_blocks]}; AMG GFLOPs "
            f"{amg.model_amg_macs(model) / 1e9:.4g} (prunable blocks, as the paper reports), whole model "
            f"{measured / 1e9:.4g} GMACs measured (explicit attention)")


def prune(cfg, net, model, loss_fn, teacher_loss, loader, device, round_: int, counts: list[int], folder=None) -> None:
    """One scoring epoch on `model` (`net`: the same, DDP-wrapped under torchrun), then its AMG pruning
    step (in place)."""
    mode, n = cfg.FINETUNE.PRUNE_MODE, counts[round_]
    if mode in ("attn", "head_entropy"):
        scorer = amg.TokenScorer(model) if mode == "attn" else amg.HeadEntropyScorer(
            model, cfg.SOLVER.IMS_PER_BATCH // distributed.world_size())
        processor.train_one_epoch(net, loader, None, loss_fn, device, round_ + 1, cfg.FINETUNE.ITER_NUM,
                                  teacher_loss, desc="scoring")
        scorer.detach()
    if mode == "attn":
        scores = [distributed.sum_tensor_over_ranks(s, device) for s in scorer.patch_scores()]
        if not all(torch.isfinite(s).all() for s in scores):
            raise processor.RunError(f"round {round_ + 1}: the attention gradients of the scoring epoch are not finite "
                                     "(try a lower SOLVER.BASE_LR for the start model); nothing was pruned")
        try:
            amg.apply_token_masks(model, amg.select_tokens(scores, n, amg.token_masks(model)))
        except ValueError as e:  # a start model whose tokens were already pruned: too few left
            raise processor.RunError(f"FINETUNE.PRUNE_RATE {cfg.FINETUNE.PRUNE_RATE}: {e}") from None
        return
    if mode == "head_entropy":
        # the maps summed over all ranks' batches (each rank saw the same number of full batches)
        scorer.sums = [distributed.sum_tensor_over_ranks(s, device) for s in scorer.sums]
        scorer.count = [c * distributed.world_size() for c in scorer.count]
        entropies = scorer.entropies()
    elif mode == "head":
        entropies = head_rank_scores(cfg, model)
    else:  # random: the same draw on every rank
        gen = torch.Generator().manual_seed(cfg.SOLVER.SEED + round_)
        entropies = [torch.rand(b.attn.heads, generator=gen, dtype=torch.float64) for b in model.prunable_blocks]
    before = sum(b.attn.heads for b in model.prunable_blocks)
    amg.apply_head_masks(model, amg.select_heads(entropies, n))
    removed = before - sum(b.attn.heads for b in model.prunable_blocks)
    if removed < n:  # every layer keeps its last head (one-head layers keep theirs)
        processor.log(folder, f"note: round {round_ + 1} asked to remove {n} heads but only {removed} could go (each "
                            "layer keeps at least one head)")


def head_rank_scores(cfg, model) -> list[torch.Tensor]:
    """FINETUNE.HEAD_RANK as per-layer scores; checked against the start model's heads before any work."""
    scores = [torch.tensor(r, dtype=torch.float64) for r in cfg.FINETUNE.HEAD_RANK]
    heads = [b.attn.heads for b in model.prunable_blocks]
    if [len(s) for s in scores] != heads:
        raise ConfigError(f"FINETUNE.HEAD_RANK has {[len(s) for s in scores]} scores per layer; the start model's "
                          f"prunable layers have {heads} heads (one score per head of each)")
    return scores


RESUME_KEYS = ("model", "optimizer", "next_step", "rng", "history", "best")
KIND = "transreid.finetune"


def main(args: argparse.Namespace) -> dict:
    scaffold.check_run_flags(args.resume, args.overwrite)
    cfg = load_config(args.config_file, args.opts)
    f, s = cfg.FINETUNE, cfg.SOLVER
    if not f.PRETRAIN_PATH:
        raise ConfigError("FINETUNE.PRETRAIN_PATH is empty: name the trained TransReID checkpoint to prune")
    folder = processor.run_folder(cfg, args.resume, args.overwrite, [f.PRETRAIN_PATH])
    start_ckpt = read_reid_checkpoint(f.PRETRAIN_PATH, "FINETUNE.PRETRAIN_PATH")
    resume = scaffold.load_resume(folder.resume_file, KIND, RESUME_KEYS) if args.resume else None
    device = processor.select_device(cfg)
    rank, world = distributed.rank(), distributed.world_size()
    utils.seed_everything(s.SEED + rank)
    splits = read_dataset(cfg)
    processor.check_checkpoint_fits(start_ckpt, splits, f.PRETRAIN_PATH, "FINETUNE.PRETRAIN_PATH", classes=True)
    loader, test_loader = make_train_loader(cfg, splits, rank, world), make_test_loader(cfg, splits, rank, world)
    teacher = model_from_checkpoint(cfg, start_ckpt, f.PRETRAIN_PATH).to(device).eval().requires_grad_(False)
    model = model_from_checkpoint(cfg, resume["model"] if resume else start_ckpt, f.PRETRAIN_PATH).to(device)

    def teacher_loss(imgs, cams, logits):
        if f.DISTILL_TYPE == "none":
            return 0.0
        with torch.no_grad():
            target = teacher.classify(teacher.features(imgs, cams))
        return f.DISTILL_ALPHA * distillation_loss(logits, target, f.DISTILL_TYPE, f.DISTILL_TAU)

    if f.PRUNE_MODE == "head" and resume is None:
        head_rank_scores(cfg, model)
    steps = schedule(cfg)
    epochs = sum(1 for kind, _ in steps if kind == "tune")
    counts = amg.split_over_rounds(amg.prune_counts(model, "attn" if f.PRUNE_MODE == "attn" else "heads",
                                                    f.PRUNE_RATE), f.ITER_NUM)
    optimizer = make_optimizer(cfg, model)
    start, history, best = 0, [], {"mAP": -1.0}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scaffold.restore_rng(resume["rng"])  # one state per rank of the interrupted run
        start, history, best = resume["next_step"], resume["history"], resume["best"]
    processor.log(folder, f"AMG {f.PRUNE_MODE} rate {f.PRUNE_RATE} from {f.PRETRAIN_PATH}: removing {counts} per "
                          f"round, {epochs} fine-tuning epochs, distillation {f.DISTILL_TYPE}")
    if start == 0:
        processor.log(folder, "start: " + cost_line(model, cfg.INPUT.SIZE_TEST))
    loss_fn = make_loss(cfg)
    net = processor.wrap(model, device)
    folder.start()
    try:
        for i in range(start, len(steps)):
            net, optimizer = run_step(cfg, i, steps, epochs, (net, model, optimizer), loss_fn, teacher_loss,
                                      (loader, test_loader, len(splits.query)), device, counts, folder, history, best)
            if i == args.stop_after_step:
                processor.log(folder, f"stopped after step {i} (--stop_after_step); continue with --resume")
                break
        else:
            processor.log(folder, "end: " + cost_line(model, cfg.INPUT.SIZE_TEST))
            if best["mAP"] >= 0:
                processor.log(folder, f"best.pth: epoch {best['epoch']}, mAP {100 * best['mAP']:.1f} (chosen on the "
                                      "test set)")
    except BaseException:
        folder.discard()
        raise
    distributed.cleanup()
    return {"history": history, "best": best}


def run_step(cfg, i: int, steps: list[tuple[str, int]], epochs: int, models: tuple, loss_fn, teacher_loss,
             data: tuple, device, counts: list[int], folder, history: list[dict], best: dict) -> tuple:
    """Step i of the schedule (a pruning round or a fine-tuning epoch), then rank 0's files; returns the
    (DDP-wrapped) net and the optimiser to go on with. `best` is updated in place."""
    f, s = cfg.FINETUNE, cfg.SOLVER
    (net, model, optimizer), (loader, test_loader, num_query) = models, data
    kind, value = steps[i]
    if kind == "prune":
        prune(cfg, net, model, loss_fn, teacher_loss, loader, device, value, counts, folder)
        net = processor.wrap(model, device)  # DDP again: the parameters changed shape
        optimizer = make_optimizer(cfg, model)  # a new optimiser for the pruned parameters
        processor.log(folder, f"round {value + 1}/{f.ITER_NUM}: " + cost_line(model, cfg.INPUT.SIZE_TEST))
        record = {"step": i, "round": value + 1}
    else:
        lr = set_epoch_lr(optimizer, value, s.BASE_LR, epochs, s.WARMUP_EPOCHS)
        stats = processor.train_one_epoch(net, loader, optimizer, loss_fn, device, value, epochs, teacher_loss,
                                          desc="fine-tune")
        scaffold.check_finite_weights(model, f"fine-tuning epoch {value}")
        record = {"step": i, "epoch": value, "lr": lr, **stats}
        final = i >= len(steps) - f.FINAL_NUM
        if final and (value % s.EVAL_PERIOD == 0 or i == len(steps) - 1):
            record.update(processor.test_model(cfg, model, test_loader, num_query, device)[0])
        processor.log(folder, f"epoch {value}/{epochs}  loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  "
                              f"lr {lr:.2e}" + (f"  {processor.format_metrics(record)}" if "mAP" in record else ""))
    history.append(record)
    rng = scaffold.gather_rng()
    if distributed.is_main():
        out = folder.path
        processor.save_config(cfg, out)
        ckpt = checkpoint(model, step=i, prune_mode=f.PRUNE_MODE, prune_rate=f.PRUNE_RATE)
        if record.get("mAP", -1.0) > best["mAP"]:
            best.update(mAP=record["mAP"], epoch=record["epoch"])
            scaffold.save_checkpoint({**ckpt, "chosen_on": "test set mAP", "metrics": record}, out / "best.pth")
        if i == len(steps) - 1:
            scaffold.save_checkpoint({**ckpt, "metrics": record}, out / "last.pth")
        scaffold.save_resume({"model": ckpt, "optimizer": optimizer.state_dict(), "next_step": i + 1, "rng": rng,
                             "history": history, "best": best}, out / "resume.pth", KIND)
        folder.commit()
    return net, optimizer


def get_parser() -> argparse.ArgumentParser:
    p = get_args_parser(__doc__.splitlines()[0])
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR from its resume.pth")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUTPUT_DIR")
    p.add_argument("--stop_after_step", type=cli.nonnegative_int, default=None,
                   help="stop after this step of the schedule (0-based; pruning rounds and epochs are steps) as "
                        "if interrupted; --resume continues")
    return p


if __name__ == "__main__":
    cli.run_main(main, get_parser().parse_intermixed_args(), (ConfigError, DatasetError, ModelError,
                                                              processor.RunError))
