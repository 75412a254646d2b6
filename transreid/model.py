"""TransReID: a ViT with overlapping patches, a camera embedding (SIE) and the jigsaw patch module (JPM).

The backbone's state-dict keys are timm's VisionTransformer keys (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.i.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`, `norm`), so ImageNet ViT weights
load with nothing but a position-embedding resize. Two things differ from timm on purpose:
- each block has its own head count (`heads[i]`) at a fixed head width: AMG removes whole heads;
- attention is computed explicitly (softmax of q.k) so that AMG can read the maps and their gradients;
  `use_fused_attention(True)` switches inference to scaled_dot_product_attention (same features).
A block may also be given a fixed set of token positions (`keep`): only those tokens enter it, the
others pass it unchanged (AMG token pruning).
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model import ModelError, load_checkpoint  # noqa: F401  (ModelError re-exported: one error class for both)
from toolkit.run import state_dict_mismatch

# name -> widths; the factories below only read these, nothing is mutated
ARCH_WIDTHS = {
    "vit_base_patch16_224_TransReID": dict(dim=768, depth=12, heads=12, head_dim=64, mlp_ratio=4.0, qkv_bias=True,
                                           scale=None),
    # the "old" ViT-S of TransReID: wide (768), shallow, 96-wide heads, no qkv bias, scale 768^-0.5
    "vit_small_patch16_224_TransReID": dict(dim=768, depth=8, heads=8, head_dim=96, mlp_ratio=3.0, qkv_bias=False,
                                            scale=768 ** -0.5),
    "vit_tiny_TransReID": dict(dim=64, depth=4, heads=4, head_dim=16, mlp_ratio=2.0, qkv_bias=True, scale=None),
}
PATCH = 16


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention with `heads` heads of width `head_dim` (heads * head_dim need not be dim).

    `recorder`, when set, is called with the post-softmax map [B, heads, N, N] (AMG scoring)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qkv_bias: bool, scale: float | None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = False
        self.recorder = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused and self.recorder is None and not self.training:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if self.recorder is not None:
                self.recorder(attn)
            out = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block. With `keep` (token positions, CLS included) only those tokens are
    queries, keys, values and MLP inputs; the others are returned unchanged."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, qkv_bias: bool, scale: float | None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, head_dim, qkv_bias, scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, drop)
        self.register_buffer("keep", None, persistent=False)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return self.update(x)
        return x.index_copy(1, self.keep, self.update(x.index_select(1, self.keep)))


class PatchEmbed(nn.Module):
    """16x16 patches taken every `stride` pixels (overlapping when stride < 16)."""

    def __init__(self, img_size: tuple[int, int], stride: tuple[int, int], dim: int):
        super().__init__()
        self.grid = tuple((s - PATCH) // st + 1 for s, st in zip(img_size, stride))
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The TransReID backbone: tokens = CLS + patches (+ position, + SIE_COE * camera embedding)."""

    def __init__(self, img_size: tuple[int, int], stride: tuple[int, int], dim: int, depth: int, heads: list[int],
                 head_dim: int, mlp_ratio: float, qkv_bias: bool, scale: float | None, camera_num: int = 0,
                 sie_coe: float = 3.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, stride, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.sie_coe = sie_coe
        self.sie_embed = nn.Parameter(torch.zeros(camera_num, 1, dim)) if camera_num > 0 else None
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads[i], head_dim, int(dim * mlp_ratio), qkv_bias, scale, drop_rate,
                                          attn_drop_rate, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.cls_token, self.pos_embed) + ((self.sie_embed,) if self.sie_embed is not None else ()):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks.apply(_init_vit)

    def tokens(self, x: torch.Tensor, cam: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.sie_embed is not None:
            cam = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if cam is None else cam
            x = x + self.sie_coe * self.sie_embed[cam]
        return self.pos_drop(x)

    def forward(self, x: torch.Tensor, cam: torch.Tensor | None = None, last: bool = True) -> torch.Tensor:
        """All tokens after every block and the final norm; with last=False after blocks[:-1], no norm."""
        x = self.tokens(x, cam)
        for blk in self.blocks if last else self.blocks[:-1]:
            x = blk(x)
        return self.norm(x) if last else x


def _init_vit(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def bnneck(dim: int, num_classes: int) -> tuple[nn.BatchNorm1d, nn.Linear]:
    """BatchNorm (frozen zero bias) then a bias-free classifier, initialised as TransReID does."""
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    fc = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return bn, fc


def shuffle_tokens(x: torch.Tensor, shift: int, groups: int) -> torch.Tensor:
    """JPM re-arrangement of [B, 1 + P, D] tokens (CLS at 0) into P (or P + 1) patch tokens: shift
    (tokens shift.. then 1..shift-1), then shuffle (view [B, groups, -1, D], swap the two middle axes).
    When P is not a multiple of `groups`, a copy of the second-to-last token is appended first."""
    b, _, d = x.shape
    x = torch.cat([x[:, shift:], x[:, 1:shift]], dim=1)
    if x.shape[1] % groups:
        x = torch.cat([x, x[:, -2:-1]], dim=1)
    return x.view(b, groups, -1, d).transpose(1, 2).reshape(b, -1, d)


class TransReID(nn.Module):
    """Backbone + BNNeck heads; with JPM a global branch b1 and a local branch b2 (copies of the last
    block). Training: (logits list, features list); eval: the test feature (see `extract`)."""

    def __init__(self, num_classes: int, camera_num: int, arch: str, img_size: tuple[int, int],
                 stride: tuple[int, int], jpm: bool = False, sie_camera: bool = False, sie_coe: float = 3.0,
                 heads: list[int] | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, shift_num: int = 5, shuffle_group: int = 2, devide_length: int = 4,
                 rearrange: bool = True, neck_feat: str = "before"):
        super().__init__()
        w = ARCH_WIDTHS[arch]
        self.arch, self.num_classes, self.camera_num = arch, num_classes, camera_num
        self.jpm, self.neck_feat = jpm, neck_feat
        self.shift_num, self.shuffle_group, self.devide_length, self.rearrange = (shift_num, shuffle_group,
                                                                                  devide_length, rearrange)
        heads = list(heads) if heads is not None else [w["heads"]] * w["depth"]
        if len(heads) != w["depth"] or min(heads) < 1:
            raise ModelError(f"{arch} has {w['depth']} blocks of at least one head, got heads {heads}")
        self.base = VisionTransformer(tuple(img_size), tuple(stride), w["dim"], w["depth"], heads, w["head_dim"],
                                      w["mlp_ratio"], w["qkv_bias"], w["scale"], camera_num if sie_camera else 0,
                                      sie_coe, drop_rate, attn_drop_rate, drop_path_rate)
        dim = w["dim"]
        n_feats = 1 + devide_length if jpm else 1
        necks = [bnneck(dim, num_classes) for _ in range(n_feats)]
        self.bottlenecks = nn.ModuleList(bn for bn, _ in necks)
        self.classifiers = nn.ModuleList(fc for _, fc in necks)
        if jpm:
            self.make_jpm_branches()
            # with JPM the backbone stops before its last block: that block and the final norm only seed b1/b2
            # and get no gradient; frozen, so DDP does not wait for them (the optimiser skips them either way)
            self.base.blocks[-1].requires_grad_(False)
            self.base.norm.requires_grad_(False)

    def make_jpm_branches(self) -> None:
        """b1 (global) and b2 (local) start as copies of the backbone's last block and norm; call again
        after loading ImageNet weights into the backbone, as TransReID builds them from loaded weights."""
        self.b1 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm)).requires_grad_(True)
        self.b2 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm)).requires_grad_(True)

    @property
    def prunable_blocks(self) -> list[Block]:
        """The blocks AMG may prune: the backbone's blocks[:-1] (never the last block or the JPM copies)."""
        return list(self.base.blocks[:-1])

    def features(self, x: torch.Tensor, cam: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[global] or, with JPM, [global, local_1, ..., local_k], all before the BNNeck."""
        if not self.jpm:
            return [self.base(x, cam)[:, 0]]
        x = self.base(x, cam, last=False)
        feats = [self.b1(x)[:, 0]]
        cls = x[:, :1]
        parts = shuffle_tokens(x, self.shift_num, self.shuffle_group) if self.rearrange else x[:, 1:]
        length = (x.shape[1] - 1) // self.devide_length
        for i in range(self.devide_length):
            feats.append(self.b2(torch.cat([cls, parts[:, i * length:(i + 1) * length]], dim=1))[:, 0])
        return feats

    def forward(self, x: torch.Tensor, cam: torch.Tensor | None = None):
        feats = self.features(x, cam)
        if self.training:
            return self.classify(feats), feats
        return self.test_feature(feats)

    def classify(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """One logit vector per feature, through its BNNeck (the running statistics in eval mode)."""
        return [fc(bn(f)) for f, bn, fc in zip(feats, self.bottlenecks, self.classifiers)]

    def test_feature(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """cat(global, local_1 / k, ..., local_k / k), before or after the BNNeck (TEST.NECK_FEAT)."""
        if self.neck_feat == "after":
            feats = [bn(f) for f, bn in zip(feats, self.bottlenecks)]
        k = len(feats) - 1
        return torch.cat([feats[0]] + [f / k for f in feats[1:]], dim=1)

    def extract(self, x: torch.Tensor, cam: torch.Tensor | None = None) -> torch.Tensor:
        return self.test_feature(self.features(x, cam))

    def use_fused_attention(self, on: bool = True) -> None:
        """scaled_dot_product_attention in eval mode (no attention maps needed): same features, faster."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = on

    @contextlib.contextmanager
    def explicit_attention(self):
        """Explicit attention inside the block (e.g. for FlopCounterMode, which does not count SDPA on the CPU)."""
        saved = [(m, m.fused) for m in self.modules() if isinstance(m, Attention)]
        self.use_fused_attention(False)
        try:
            yield self
        finally:
            for m, fused in saved:
                m.fused = fused

    def feature_params(self) -> int:
        """Parameters that compute the test feature (classifiers and unused JPM-mode layers excluded)."""
        unused = ("classifiers.", "base.blocks.%d." % (len(self.base.blocks) - 1), "base.norm.") if self.jpm \
            else ("classifiers.",)
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(unused))

    def heads_per_layer(self) -> list[int]:
        return [blk.attn.heads for blk in self.base.blocks]

    def tokens_per_layer(self) -> list[int]:
        """Tokens each prunable block processes (kept patches + CLS; AMG's 'channels')."""
        n = self.base.patch_embed.num_patches + 1
        return [n if blk.keep is None else len(blk.keep) for blk in self.prunable_blocks]

    def token_keep(self) -> list[list[int]] | None:
        """The kept token positions (CLS = 0 included) of each prunable block; None when none is pruned."""
        keeps = [blk.keep for blk in self.prunable_blocks]
        if all(k is None for k in keeps):
            return None
        n = self.base.patch_embed.num_patches + 1
        return [list(range(n)) if k is None else k.tolist() for k in keeps]

    def set_token_keep(self, keep: list[list[int]] | None) -> None:
        """Fix the token positions each prunable block processes (None: all tokens everywhere)."""
        blocks = self.prunable_blocks
        n = self.base.patch_embed.num_patches + 1
        if keep is not None and (len(keep) != len(blocks) or any(
                0 not in k or len(set(k)) != len(k) or min(k) < 0 or max(k) >= n for k in keep)):
            raise ModelError(f"token keep lists must name {len(blocks)} layers of distinct positions in 0..{n - 1} "
                             "that include CLS (0)")
        device = self.base.cls_token.device
        for i, blk in enumerate(blocks):
            k = None if keep is None or len(keep[i]) == n else torch.tensor(sorted(keep[i]), device=device)
            blk.keep = k


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + h*w, D]: the square patch grid bilinearly resized, CLS untouched."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ModelError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def read_imagenet_vit(path: str | Path) -> dict:
    """The state dict of an ImageNet ViT file (timm key names, e.g. jx_vit_base_p16_224-80ecf9dd.pth)."""
    state = load_checkpoint(path, None, "a state dict",
                            "MODEL.PRETRAIN_PATH (an ImageNet ViT file; nothing is downloaded)")
    return state.get("model", state.get("state_dict", state))


def load_imagenet_vit(model: TransReID, state: dict, path: str | Path) -> int:
    """read_imagenet_vit's weights into the backbone; the position embedding resized to this stride grid;
    the classifier head skipped. Returns the number of tensors loaded. Rebuilds the JPM branches from the
    loaded last block."""
    own = model.base.state_dict()
    loaded = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("head", "dist", "fc_norm", "pre_logits")) or key not in own:
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            value = resize_pos_embed(value, model.base.patch_embed.grid)
        if value.shape != own[key].shape:
            raise ModelError(f"{path}: {key} has shape {tuple(value.shape)}, {model.arch} needs "
                             f"{tuple(own[key].shape)} (wrong MODEL.TRANSFORMER_TYPE?)")
        loaded[key] = value
    if "blocks.0.attn.qkv.weight" not in loaded:
        raise ModelError(f"{path} holds no ViT weights with timm key names (blocks.0.attn.qkv.weight missing)")
    model.base.load_state_dict(loaded, strict=False)
    if model.jpm:
        model.make_jpm_branches()
    return len(loaded)


def make_model(cfg, num_classes: int, camera_num: int, heads: list[int] | None = None) -> TransReID:
    """The model a config describes (random weights; see `load_imagenet_vit` and `load_reid_weights`)."""
    m = cfg.MODEL
    return TransReID(num_classes, camera_num, m.TRANSFORMER_TYPE, tuple(cfg.INPUT.SIZE_TRAIN), tuple(m.STRIDE_SIZE),
                     jpm=m.JPM, sie_camera=m.SIE_CAMERA, sie_coe=m.SIE_COE, heads=heads, drop_rate=m.DROP_OUT,
                     attn_drop_rate=m.ATT_DROP_RATE, drop_path_rate=m.DROP_PATH, shift_num=m.SHIFT_NUM,
                     shuffle_group=m.SHUFFLE_GROUP, devide_length=m.DEVIDE_LENGTH, rearrange=m.RE_ARRANGE,
                     neck_feat=cfg.TEST.NECK_FEAT)


def checkpoint(model: TransReID, **extra) -> dict:
    """Everything needed to rebuild the (possibly pruned) model: tensors and plain values only.
    channels = kept tokens + 1 per prunable layer (AMG's name), heads = heads per backbone block."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": model.arch, "num_classes": model.num_classes, "camera_num": model.camera_num,
            "heads": model.heads_per_layer(), "tokens": model.token_keep(), "channels": model.tokens_per_layer(),
            **extra}


# TransReID's own head names -> ours, so its released checkpoints load too
_REFERENCE_KEYS = [("bottleneck.", "bottlenecks.0."), ("classifier.", "classifiers.0.")] + [
    (f"{name}_{i}.", f"{name}s.{i}.") for name in ("bottleneck", "classifier") for i in range(1, 9)]


def read_reid_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A TransReID checkpoint of this package, or a bare state dict as TransReID saves it, as
    {state_dict, heads, tokens, num_classes, camera_num}."""
    ckpt = load_checkpoint(path, None, "a state dict", what)
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    state = {}
    for key, value in ckpt["state_dict"].items():
        key = key.removeprefix("module.")
        if key.startswith("base.fc."):  # TransReID's backbone always builds an unused 1000-way ImageNet head
            continue
        for old, new in _REFERENCE_KEYS:
            if key.startswith(old):
                key = new + key[len(old):]
        state[key] = value
    if "base.blocks.0.attn.qkv.weight" not in state or "classifiers.0.weight" not in state:
        raise ModelError(f"{what} {path} is not a TransReID checkpoint (no base.blocks / classifier weights)")
    ckpt["state_dict"] = state
    ckpt.setdefault("num_classes", state["classifiers.0.weight"].shape[0])
    ckpt.setdefault("camera_num", state["base.sie_embed"].shape[0] if "base.sie_embed" in state else 0)
    return ckpt


def load_reid_weights(model: TransReID, ckpt: dict, path: str | Path) -> None:
    """A read_reid_checkpoint dict into a model built for it; a mismatch is a one-line error."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise ModelError(f"{path} does not fit the configured model ({model.arch}, JPM {model.jpm}, SIE "
                         f"{model.base.sie_embed is not None}): {state_dict_mismatch(model, ckpt['state_dict'])}") \
            from None
    model.set_token_keep(ckpt.get("tokens"))


def model_from_checkpoint(cfg, ckpt: dict, path: str | Path) -> TransReID:
    """The configured architecture with the checkpoint's heads and token sets and weights."""
    if ckpt.get("arch", cfg.MODEL.TRANSFORMER_TYPE) != cfg.MODEL.TRANSFORMER_TYPE:
        raise ModelError(f"{path} holds a {ckpt['arch']}, the config asks for {cfg.MODEL.TRANSFORMER_TYPE}")
    heads = ckpt.get("heads")
    if heads is None:
        hd = ARCH_WIDTHS[cfg.MODEL.TRANSFORMER_TYPE]["head_dim"]
        state = ckpt["state_dict"]
        heads = [state[f"base.blocks.{i}.attn.proj.weight"].shape[1] // hd
                 for i in range(ARCH_WIDTHS[cfg.MODEL.TRANSFORMER_TYPE]["depth"])
                 if f"base.blocks.{i}.attn.proj.weight" in state]
    model = make_model(cfg, ckpt["num_classes"], ckpt["camera_num"], heads)
    load_reid_weights(model, ckpt, path)
    return model
