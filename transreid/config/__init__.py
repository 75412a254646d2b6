"""Configuration: defaults.py, then a yml file, then `KEY VALUE` pairs from the command line."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml
from yacs.config import CfgNode

from toolkit import cli
from toolkit.errors import UserError
from transreid.config.defaults import _C

ARCHS = ("vit_base_patch16_224_TransReID", "vit_small_patch16_224_TransReID", "vit_tiny_TransReID")
DATASETS = {"market1501": "market1501", "occ_duke": "Occluded_Duke"}  # DATASETS.NAMES -> folder under ROOT_DIR
PRUNE_MODES = ("attn", "head_entropy", "head", "random")


class ConfigError(UserError):
    """A wrong config file, key or value; printed as one line."""


def get_cfg_defaults() -> CfgNode:
    return _C.clone()


def get_args_parser(description: str) -> argparse.ArgumentParser:
    """--config_file and KEY VALUE pairs; scripts add their flags and parse with parse_intermixed_args, so
    flags may come before or after the pairs."""
    p = cli.ArgumentParser(description=description,
                           epilog="Any config key can follow the flags as KEY VALUE pairs, e.g. "
                                  "MODEL.DEVICE_ID \"('0')\" SOLVER.MAX_EPOCHS 60 (see transreid/config/defaults.py)")
    p.add_argument("--config_file", default="", help="experiment yml file (keys not in it keep their defaults)")
    p.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config keys that override the config file, e.g. SOLVER.BASE_LR 0.004")
    return p


def load_config(config_file: str, opts: list[str]) -> CfgNode:
    """defaults <- config_file <- opts, checked and frozen. Raises ConfigError with a one-line reason."""
    cfg = get_cfg_defaults()
    try:
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"config file {config_file} does not exist")
            top = yaml.safe_load(Path(config_file).read_text())
            if top is not None and not isinstance(top, dict):
                raise ConfigError(f"{config_file} must hold KEY: value mappings at its top level, not a "
                                  f"{type(top).__name__}")
            cfg.merge_from_file(config_file)
        if len(opts) % 2:
            raise ConfigError(f"config overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
        cfg.merge_from_list(list(opts))
    except KeyError as e:  # yacs: "Non-existent config key: X"
        raise ConfigError(f"{e.args[0] if e.args else e} (see transreid/config/defaults.py)") from None
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    except Exception as e:  # a malformed yml file
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"{config_file} is not valid YAML: {' '.join(str(e).split())}") from None
        raise
    check_config(cfg)
    cfg.freeze()
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _pair(value, key: str) -> None:
    _require(len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value),
             f"{key} must be two positive integers (height, width), got {list(value)}")


def patch_grid(size, stride) -> tuple[int, int]:
    """Rows and columns of 16-pixel patches taken every `stride` pixels (as the model's PatchEmbed)."""
    return tuple((v - 16) // st + 1 for v, st in zip(size, stride))


def check_config(cfg: CfgNode) -> None:
    """Every value the code relies on, checked once before any work."""
    m, s, i, t, f = cfg.MODEL, cfg.SOLVER, cfg.INPUT, cfg.TEST, cfg.FINETUNE
    _require(m.TRANSFORMER_TYPE in ARCHS,
             f"MODEL.TRANSFORMER_TYPE {m.TRANSFORMER_TYPE!r} is not one of {', '.join(ARCHS)}")
    _require(m.DEVICE in ("cuda", "cpu"), f"MODEL.DEVICE must be 'cuda' or 'cpu', got {m.DEVICE!r}")
    _require(m.NAME == "transformer", f"MODEL.NAME {m.NAME!r}: only 'transformer' is implemented here")
    _require(cfg.DATASETS.NAMES in DATASETS, f"DATASETS.NAMES {cfg.DATASETS.NAMES!r} is not one of "
                                              f"{', '.join(DATASETS)}")
    for key, value, off in (("MODEL.IF_WITH_CENTER", m.IF_WITH_CENTER, "no"), ("MODEL.COS_LAYER", m.COS_LAYER, False),
                            ("MODEL.SIE_VIEW", m.SIE_VIEW, False), ("MODEL.NECK", m.NECK, "bnneck"),
                            ("MODEL.ID_LOSS_TYPE", m.ID_LOSS_TYPE, "softmax"),
                            ("MODEL.METRIC_LOSS_TYPE", m.METRIC_LOSS_TYPE, "triplet"),
                            ("DATALOADER.SAMPLER", cfg.DATALOADER.SAMPLER, "softmax_triplet"),
                            ("SOLVER.WARMUP_METHOD", s.WARMUP_METHOD, "linear")):
        _require(value == off, f"{key} {value!r} is not implemented here (only {off!r})")
    _require(m.PRETRAIN_CHOICE in ("imagenet", "self", "none"),
             f"MODEL.PRETRAIN_CHOICE must be 'imagenet', 'self' or 'none', got {m.PRETRAIN_CHOICE!r}")
    _require(m.IF_LABELSMOOTH in ("on", "off"), "MODEL.IF_LABELSMOOTH must be 'on' or 'off'")
    _pair(m.STRIDE_SIZE, "MODEL.STRIDE_SIZE")
    _pair(i.SIZE_TRAIN, "INPUT.SIZE_TRAIN")
    _pair(i.SIZE_TEST, "INPUT.SIZE_TEST")
    _require(all(16 <= v for v in list(i.SIZE_TRAIN) + list(i.SIZE_TEST)),
             "INPUT sizes must be at least 16 (the patch)")
    _require(len(i.PIXEL_MEAN) == 3 and len(i.PIXEL_STD) == 3 and all(v > 0 for v in i.PIXEL_STD),
             "INPUT.PIXEL_MEAN and INPUT.PIXEL_STD need three values (std > 0)")
    for key, value in (("INPUT.PROB", i.PROB), ("INPUT.RE_PROB", i.RE_PROB), ("MODEL.DROP_PATH", m.DROP_PATH),
                       ("MODEL.DROP_OUT", m.DROP_OUT), ("MODEL.ATT_DROP_RATE", m.ATT_DROP_RATE)):
        _require(0.0 <= value <= 1.0, f"{key} must be in [0, 1], got {value}")
    for key, value in (("SOLVER.BASE_LR", s.BASE_LR), ("SOLVER.MAX_EPOCHS", s.MAX_EPOCHS),
                       ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH), ("TEST.IMS_PER_BATCH", t.IMS_PER_BATCH),
                       ("DATALOADER.NUM_INSTANCE", cfg.DATALOADER.NUM_INSTANCE),
                       ("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD), ("SOLVER.EVAL_PERIOD", s.EVAL_PERIOD),
                       ("SOLVER.LOG_PERIOD", s.LOG_PERIOD), ("MODEL.DEVIDE_LENGTH", m.DEVIDE_LENGTH),
                       ("MODEL.SHUFFLE_GROUP", m.SHUFFLE_GROUP), ("MODEL.SHIFT_NUM", m.SHIFT_NUM),
                       ("FINETUNE.ITER_NUM", f.ITER_NUM), ("SOLVER.BIAS_LR_FACTOR", s.BIAS_LR_FACTOR)):
        _require(math.isfinite(value) and value > 0, f"{key} must be positive, got {value}")
    for key, value in (("SOLVER.WEIGHT_DECAY", s.WEIGHT_DECAY), ("SOLVER.WEIGHT_DECAY_BIAS", s.WEIGHT_DECAY_BIAS),
                       ("SOLVER.MOMENTUM", s.MOMENTUM), ("SOLVER.MARGIN", s.MARGIN), ("SOLVER.WARMUP_EPOCHS",
                       s.WARMUP_EPOCHS), ("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS),
                       ("MODEL.SIE_COE", m.SIE_COE), ("FINETUNE.FINE_NUM", f.FINE_NUM),
                       ("FINETUNE.FINAL_NUM", f.FINAL_NUM), ("FINETUNE.DISTILL_ALPHA", f.DISTILL_ALPHA)):
        _require(math.isfinite(value) and value >= 0, f"{key} must be non-negative, got {value}")
    _require(s.OPTIMIZER_NAME in ("SGD", "AdamW"), "SOLVER.OPTIMIZER_NAME must be 'SGD' or 'AdamW'")
    k = cfg.DATALOADER.NUM_INSTANCE
    _require(s.IMS_PER_BATCH % k == 0 and s.IMS_PER_BATCH // k >= 2,
             f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} must be a multiple of DATALOADER.NUM_INSTANCE {k} holding "
             "at least 2 identities (the triplet loss takes its negatives from other identities)")
    _require(t.NECK_FEAT in ("before", "after"), f"TEST.NECK_FEAT must be 'before' or 'after', got {t.NECK_FEAT!r}")
    _require(t.FEAT_NORM in ("yes", "no"), f"TEST.FEAT_NORM must be 'yes' or 'no', got {t.FEAT_NORM!r}")
    _require(f.PRUNE_MODE in PRUNE_MODES,
             f"FINETUNE.PRUNE_MODE {f.PRUNE_MODE!r} is not one of {', '.join(PRUNE_MODES)}")
    _require(0.0 <= f.PRUNE_RATE < 1.0, f"FINETUNE.PRUNE_RATE must be in [0, 1), got {f.PRUNE_RATE}")
    _require(f.DISTILL_TYPE in ("soft", "hard", "none"), "FINETUNE.DISTILL_TYPE must be 'soft', 'hard' or 'none'")
    _require(math.isfinite(f.DISTILL_TAU) and f.DISTILL_TAU > 0, "FINETUNE.DISTILL_TAU must be positive")
    _require(all(isinstance(r, (list, tuple)) and r and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and math.isfinite(x) for x in r) for r in f.HEAD_RANK),
             "FINETUNE.HEAD_RANK must be a list of lists of numbers, one list of per-head scores per prunable layer, "
             "e.g. [[0.1, 0.5, ...], ...]")
    _require(f.PRUNE_MODE != "head" or (len(f.HEAD_RANK) > 0 and f.ITER_NUM == 1),
             "FINETUNE.PRUNE_MODE 'head' needs FINETUNE.HEAD_RANK (one score per head of each prunable layer) and "
             "FINETUNE.ITER_NUM 1 (the ranks name the heads of the starting model)")
    _require(cfg.OUTPUT_DIR != "", "OUTPUT_DIR must name a folder")
    _require(all(v <= 16 for v in m.STRIDE_SIZE),
             f"MODEL.STRIDE_SIZE {list(m.STRIDE_SIZE)} must not exceed the 16-pixel patch (gaps would skip pixels)")
    train_grid, test_grid = patch_grid(i.SIZE_TRAIN, m.STRIDE_SIZE), patch_grid(i.SIZE_TEST, m.STRIDE_SIZE)
    _require(train_grid == test_grid,
             f"INPUT.SIZE_TEST {list(i.SIZE_TEST)} gives a {test_grid[0]}x{test_grid[1]} patch grid, but the position "
             f"embedding is made for INPUT.SIZE_TRAIN {list(i.SIZE_TRAIN)}'s {train_grid[0]}x{train_grid[1]}")
    patches = train_grid[0] * train_grid[1]
    if m.JPM:
        for key, value in (("MODEL.SHIFT_NUM", m.SHIFT_NUM), ("MODEL.SHUFFLE_GROUP", m.SHUFFLE_GROUP),
                           ("MODEL.DEVIDE_LENGTH", m.DEVIDE_LENGTH)):
            _require(value < patches, f"{key} {value} must be smaller than the {patches} patch tokens "
                                      f"(INPUT.SIZE_TRAIN {list(i.SIZE_TRAIN)} at stride {list(m.STRIDE_SIZE)})")
    _require(isinstance(s.SEED, int) and 0 <= s.SEED < 2 ** 32, f"SOLVER.SEED must be an integer in [0, 2^32), "
                                                                  f"got {s.SEED}")
    _require(isinstance(i.PADDING, int) and 0 <= i.PADDING < min(i.SIZE_TRAIN),
             f"INPUT.PADDING must be a whole number of pixels in [0, {min(i.SIZE_TRAIN)}) (smaller than the crop), "
             f"got {i.PADDING}")
