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

import cli
import distributed
import utils
from dataset_layout import DatasetError
from model import load_checkpoint
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


def prune(cfg, net, model, loss_fn, teacher_loss, loader, device, round_: int, counts: list[int]) -> None:
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
        entropies = [torch.tensor(r, dtype=torch.float64) for r in cfg.FINETUNE.HEAD_RANK]
        if [len(e) for e in entropies] != [b.attn.heads for b in model.prunable_blocks]:
            raise ConfigError(f"FINETUNE.HEAD_RANK needs one score per head of each prunable layer "
                              f"{[b.attn.heads for b in model.prunable_blocks]}")
    else:  # random: the same draw on every rank
        gen = torch.Generator().manual_seed(cfg.SOLVER.SEED + round_)
        entropies = [torch.rand(b.attn.heads, generator=gen, dtype=torch.float64) for b in model.prunable_blocks]
    amg.apply_head_masks(model, amg.select_heads(entropies, n))


def main(args: argparse.Namespace) -> dict:
    processor.check_run_flags(args.resume, args.overwrite)
    cfg = load_config(args.config_file, args.opts)
    f, s = cfg.FINETUNE, cfg.SOLVER
    if not f.PRETRAIN_PATH:
        raise ConfigError("FINETUNE.PRETRAIN_PATH is empty: name the trained TransReID checkpoint to prune")
    start_ckpt = read_reid_checkpoint(f.PRETRAIN_PATH, "FINETUNE.PRETRAIN_PATH")
    out = processor.prepare_run_folder(cfg, args.resume, args.overwrite)
    resume = load_checkpoint(out / "resume.pth", "model", "a resume file of this package", "resume file") \
        if args.resume else None
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

    steps = schedule(cfg)
    epochs = sum(1 for kind, _ in steps if kind == "tune")
    counts = amg.split_over_rounds(amg.prune_counts(model, "attn" if f.PRUNE_MODE == "attn" else "heads",
                                                    f.PRUNE_RATE), f.ITER_NUM)
    optimizer = make_optimizer(cfg, model)
    start, history, best = 0, [], {"mAP": -1.0}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        rng = resume["rng"]  # one state per rank of the interrupted run
        utils.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        start, history, best = resume["next_step"], resume["history"], resume["best"]
    processor.log(out, f"AMG {f.PRUNE_MODE} rate {f.PRUNE_RATE} from {f.PRETRAIN_PATH}: removing {counts} per round, "
                       f"{epochs} fine-tuning epochs, distillation {f.DISTILL_TYPE}")
    if start == 0:
        processor.log(out, "start: " + cost_line(model, cfg.INPUT.SIZE_TEST))
    loss_fn = make_loss(cfg)
    net = processor.wrap(model, device)
    for i in range(start, len(steps)):
        kind, value = steps[i]
        if kind == "prune":
            prune(cfg, net, model, loss_fn, teacher_loss, loader, device, value, counts)
            net = processor.wrap(model, device)  # DDP again: the parameters changed shape
            optimizer = make_optimizer(cfg, model)  # a new optimiser for the pruned parameters
            processor.log(out, f"round {value + 1}/{f.ITER_NUM}: " + cost_line(model, cfg.INPUT.SIZE_TEST))
            record = {"step": i, "round": value + 1}
        else:
            lr = set_epoch_lr(optimizer, value, s.BASE_LR, epochs, s.WARMUP_EPOCHS)
            stats = processor.train_one_epoch(net, loader, optimizer, loss_fn, device,
                                              value, epochs, teacher_loss, desc="fine-tune")
            processor.check_finite(model, f"fine-tuning epoch {value}")
            record = {"step": i, "epoch": value, "lr": lr, **stats}
            final = i >= len(steps) - f.FINAL_NUM
            if final and (value % s.EVAL_PERIOD == 0 or i == len(steps) - 1):
                record.update(processor.test_model(cfg, model, test_loader, len(splits.query), device)[0])
            processor.log(out, f"epoch {value}/{epochs}  loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  "
                               f"lr {lr:.2e}" + (f"  {processor.format_metrics(record)}" if "mAP" in record else ""))
        history.append(record)
        rng = distributed.all_gather_object(utils.rng_state())
        if distributed.is_main():
            processor.save_config(cfg, out)
            ckpt = checkpoint(model, step=i, prune_mode=f.PRUNE_MODE, prune_rate=f.PRUNE_RATE)
            if record.get("mAP", -1.0) > best["mAP"]:
                best = {"mAP": record["mAP"], "epoch": record["epoch"]}
                utils.save_atomic({**ckpt, "chosen_on": "test set mAP", "metrics": record}, out / "best.pth")
            if i == len(steps) - 1:
                utils.save_atomic({**ckpt, "metrics": record}, out / "last.pth")
            utils.save_atomic({"model": ckpt, "optimizer": optimizer.state_dict(), "next_step": i + 1,
                               "rng": rng, "history": history, "best": best}, out / "resume.pth")
        if i == args.stop_after_step:
            processor.log(out, f"stopped after step {i} (--stop_after_step); continue with --resume")
            break
    else:
        processor.log(out, "end: " + cost_line(model, cfg.INPUT.SIZE_TEST))
        if best["mAP"] >= 0:
            processor.log(out, f"best.pth: epoch {best['epoch']}, mAP {100 * best['mAP']:.1f} (chosen on the test set)")
    distributed.cleanup()
    return {"history": history, "best": best}


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
