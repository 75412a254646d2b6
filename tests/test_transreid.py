"""transreid/: the ViT against timm, position-embedding resize, JPM re-arrangement, SIE, configs, the
schedule against timm's, the sampler, training (beats untrained, resume, two ranks = one process)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY_CFG, run_script

from transreid import model as tr
from transreid.config import ConfigError, load_config


def small_vit(stride=(16, 16), heads=(4, 4)) -> tr.VisionTransformer:
    return tr.VisionTransformer((64, 32), stride, dim=64, depth=len(heads), heads=list(heads), head_dim=16,
                                mlp_ratio=4.0, qkv_bias=True, scale=None)


def test_backbone_equals_timm_vit_loaded_from_its_state_dict():
    import timm.models.vision_transformer as tv
    torch.manual_seed(0)
    ref = tv.VisionTransformer(img_size=(64, 32), patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                               qkv_bias=True, num_classes=0).eval()
    ours = small_vit().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)
    missing = set(ours.state_dict()) - set(ref.state_dict())
    assert not missing  # every tensor of ours has timm's name
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 0]
        assert (ours(x)[:, 0] - expected).abs().max() < 1e-5
        ours.blocks[0].attn.fused = ours.blocks[1].attn.fused = True
        assert (ours(x)[:, 0] - expected).abs().max() < 1e-5


def test_imagenet_file_loads_with_resized_position_embedding(tmp_path):
    import timm.models.vision_transformer as tv
    ref = tv.VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                               num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    model = tr.TransReID(5, 0, "vit_tiny_TransReID", (256, 128), (12, 12), jpm=True)
    n = tr.load_imagenet_vit(model, tr.read_imagenet_vit(tmp_path / "vit.pth"), tmp_path / "vit.pth")
    assert n == len(ref.state_dict()) - 2  # all but the classifier head
    assert model.base.pos_embed.shape == (1, 1 + 21 * 10, 64)
    assert torch.equal(model.base.blocks[3].attn.qkv.weight, ref.blocks[3].attn.qkv.weight)
    assert torch.equal(model.b1[0].mlp.fc2.weight, ref.blocks[3].mlp.fc2.weight)  # JPM copies loaded weights
    with pytest.raises(tr.ModelError, match="does not exist"):
        tr.read_imagenet_vit(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(tr.ModelError, match="is corrupt"):
        tr.read_imagenet_vit(tmp_path / "bad.pth")


def test_position_embedding_resize_is_bilinear_on_the_grid_and_keeps_cls():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = tr.resize_pos_embed(pos, (21, 10))
    grid = pos[0, 1:].reshape(14, 14, 8).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(21, 10), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert out.shape == (1, 1 + 210, 8)
    assert torch.equal(out[0, 0], pos[0, 0])
    assert torch.allclose(out[0, 1:].reshape(21, 10, 8), expected, atol=1e-6)
    # corners of an align_corners=False upsampling of a linear ramp stay inside the ramp
    ramp = torch.arange(196.0).reshape(1, 196, 1)
    ramp = torch.cat([torch.zeros(1, 1, 1), ramp], 1)
    assert tr.resize_pos_embed(ramp, (21, 10))[0, 1:].min() >= 0


def test_jpm_shift_and_shuffle_order():
    x = torch.arange(9.0).view(1, 9, 1)  # CLS 0, patches 1..8
    assert tr.shuffle_tokens(x, 5, 2).flatten().tolist() == [5, 1, 6, 2, 7, 3, 8, 4]
    x = torch.arange(8.0).view(1, 8, 1)  # 7 patches: the second-to-last token (3) is appended first
    assert tr.shuffle_tokens(x, 5, 2).flatten().tolist() == [5, 2, 6, 3, 7, 4, 1, 3]


def test_jpm_local_features_are_the_shared_branch_on_cls_plus_each_part():
    torch.manual_seed(0)
    model = tr.TransReID(3, 0, "vit_tiny_TransReID", (64, 32), (8, 8), jpm=True).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        feats = model.features(x)
        tokens = model.base(x, last=False)
        parts = tr.shuffle_tokens(tokens, 5, 2)  # 21 patches -> 22 tokens, groups of 21 // 4 = 5
        third = model.b2(torch.cat([tokens[:, :1], parts[:, 10:15]], 1))[:, 0]
        assert torch.allclose(feats[3], third, atol=1e-6)
        assert torch.allclose(model(x), torch.cat([feats[0]] + [f / 4 for f in feats[1:]], 1))


def test_sie_camera_changes_features_only_when_on():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 32)
    for sie in (True, False):
        model = tr.TransReID(3, 4, "vit_tiny_TransReID", (64, 32), (8, 8), jpm=True, sie_camera=sie).eval()
        with torch.no_grad():
            a, b = model(x, torch.tensor([0, 1])), model(x, torch.tensor([2, 1]))
        assert (a[0] - b[0]).abs().max() > 1e-4 if sie else torch.equal(a, b)
        assert torch.equal(a[1], b[1])


def test_config_override_syntax_and_one_line_errors(tmp_path):
    cfg = load_config("transreid/configs/OCC_Duke/vit_transreid_stride.yml",
                      ["MODEL.DEVICE_ID", "('0')", "TEST.WEIGHT", "./x.pth", "SOLVER.BASE_LR", "0.004",
                       "MODEL.STRIDE_SIZE", "[12, 12]"])
    assert (cfg.MODEL.DEVICE_ID, cfg.TEST.WEIGHT, cfg.SOLVER.BASE_LR) == ("0", "./x.pth", 0.004)
    assert list(cfg.MODEL.STRIDE_SIZE) == [12, 12] and cfg.DATASETS.NAMES == "occ_duke" and cfg.MODEL.JPM
    for opts, match in ((["MODEL.NOPE", "1"], "Non-existent"), (["SOLVER.BASE_LR", "'fast'"], "mismatch"),
                        (["SOLVER.IMS_PER_BATCH", "6"], "multiple of DATALOADER.NUM_INSTANCE"),
                        (["MODEL.IF_WITH_CENTER", "yes"], "not implemented"), (["SOLVER.BASE_LR"], "pairs"),
                        (["MODEL.TRANSFORMER_TYPE", "resnet50"], "not one of")):
        with pytest.raises(ConfigError, match=match):
            load_config("", opts)
    r = run_script("-m transreid.train", "--config_file", TINY_CFG, "SOLVER.MAX_EPOCHZ", "3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "MAX_EPOCHZ" in r.stderr, r.stderr
    r = run_script("-m transreid.test", "--config_file", TINY_CFG, "TEST.WEIGHT", tmp_path / "none.pth")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_missing_imagenet_file_stops_before_work_and_leaves_the_folder_free(tmp_path, synthetic_occ_duke):
    args = ["--config_file", TINY_CFG, "DATASETS.ROOT_DIR", tmp_path / "no_data", "OUTPUT_DIR", tmp_path / "run",
            "MODEL.PRETRAIN_CHOICE", "imagenet", "MODEL.PRETRAIN_PATH", tmp_path / "vit.pth"]
    r = run_script("-m transreid.train", *args)  # the data folder is missing too: the weights are read first
    assert r.returncode == 2 and "MODEL.PRETRAIN_PATH" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # no run is recorded: a rerun needs no --overwrite
    r = run_script("-m transreid.train", *args[:2], "DATASETS.ROOT_DIR", synthetic_occ_duke, "OUTPUT_DIR",
                   tmp_path / "run", "SOLVER.MAX_EPOCHS", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "log.txt").read_text().count("epoch 1/1") == 1


def test_cosine_schedule_equals_timm_scheduler():
    from timm.scheduler import CosineLRScheduler

    from transreid.solver import cosine_lr
    p = torch.nn.Parameter(torch.zeros(1))
    for base, group_lr, epochs, warm in ((0.008, 0.016, 120, 5), (0.01, 0.01, 7, 0), (0.002, 0.004, 3, 2)):
        opt = torch.optim.SGD([{"params": [p], "lr": group_lr}], lr=group_lr)
        sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=0.002 * base, cycle_mul=1.0, cycle_decay=0.1,
                                  warmup_lr_init=0.01 * base, warmup_t=warm, cycle_limit=1, t_in_epochs=True)
        for epoch in range(1, epochs + 1):
            sched.step(epoch)
            assert cosine_lr(epoch, group_lr, base, epochs, warm) == pytest.approx(opt.param_groups[0]["lr"],
                                                                                    rel=1e-12), epoch


def test_identity_sampler_batches_and_rank_slices():
    from transreid.datasets import IdentitySampler
    labels = [i // 5 for i in range(40)] + [8, 8]  # 8 ids of 5 images, one of 2 (filled up with replacement)
    one = IdentitySampler(labels, 8, 4, seed=3)
    order = list(one)
    assert len(order) % 8 == 0 and order == list(one)  # same epoch, same order
    for b in range(0, len(order), 8):
        ids = [labels[i] for i in order[b:b + 8]]
        assert all(len(set(ids[k:k + 4])) == 1 for k in (0, 4)) and ids[0] != ids[4]
    ranks = [list(IdentitySampler(labels, 8, 4, seed=3, rank=r, world=2)) for r in (0, 1)]
    merged = [i for b in range(0, len(order) // 8) for r in (0, 1) for i in ranks[r][4 * b:4 * b + 4]]
    assert merged == order
    one.set_epoch(1)
    assert list(one) != order


def test_euclidean_scoring_ranks_like_the_distance():
    from transreid.processor import euclidean_scoring
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(5, 7)) * 3, rng.normal(size=(11, 7)) * 2
    qs, gs = euclidean_scoring(q, g)
    dist = ((q[:, None] - g[None]) ** 2).sum(-1)
    assert np.array_equal(np.argsort(-(qs @ gs.T), 1), np.argsort(dist, 1))


def test_tiny_training_beats_untrained_and_writes_checkpoints(tiny_transreid_run, synthetic_occ_duke):
    from transreid import processor
    from transreid.datasets import make_test_loader, read_dataset
    cfg = load_config(TINY_CFG, ["DATASETS.ROOT_DIR", str(synthetic_occ_duke)])
    splits = read_dataset(cfg)
    torch.manual_seed(cfg.SOLVER.SEED)  # the trained run's initial model
    untrained = tr.make_model(cfg, splits.num_classes, splits.camera_num)
    before = processor.test_model(cfg, untrained, make_test_loader(cfg, splits), len(splits.query),
                                  torch.device("cpu"))[0]
    log = (tiny_transreid_run / "log.txt").read_text()
    assert "epoch 2/2" in log
    trained_map = float(log.split("mAP ")[-1].split()[0]) / 100
    assert trained_map > before["mAP"] + 0.02, (trained_map, before)
    ckpt = torch.load(tiny_transreid_run / "transformer_2.pth", weights_only=True)
    assert ckpt["heads"] == [4, 4, 4, 4] and ckpt["tokens"] is None and ckpt["epoch"] == 2
    r = run_script("-m transreid.test", "--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "TEST.WEIGHT", tiny_transreid_run / "transformer_2.pth", "--json", tiny_transreid_run / "m.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tiny_transreid_run / "m.json").read_text())["mAP"] == pytest.approx(trained_map, abs=6e-4)
    r = run_script("-m transreid.train", "--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "OUTPUT_DIR", tiny_transreid_run)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_resume_equals_uninterrupted(tiny_transreid_run, synthetic_occ_duke, tmp_path):
    common = ["--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke, "OUTPUT_DIR", tmp_path]
    r = run_script("-m transreid.train", *common, "--stop_after_epoch", "1")
    assert r.returncode == 0 and not (tmp_path / "transformer_2.pth").exists(), r.stderr
    r = run_script("-m transreid.train", *common, "SOLVER.BASE_LR", "0.01", "--resume")
    assert r.returncode == 2 and "SOLVER.BASE_LR" in r.stderr
    r = run_script("-m transreid.train", *common, "--resume")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "transformer_2.pth", weights_only=True)["state_dict"]
    b = torch.load(tiny_transreid_run / "transformer_2.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def ddp_step(rank: int, world: int, port: int, batch: dict, out: str) -> None:
    """One forward/backward of the tiny model on this rank's share of `batch`; rank 0 saves loss and grads."""
    from toolkit import distributed
    from transreid.loss import make_loss
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(TINY_CFG, [])
    torch.manual_seed(0)
    model = tr.make_model(cfg, 4, 3)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net.train()
    for m in model.modules():  # per-rank BatchNorm statistics would differ (as with the CNNs: eval BN)
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    b = len(batch["pids"]) // world
    part = slice(rank * b, (rank + 1) * b)
    logits, feats = net(batch["imgs"][part], batch["cams"][part])
    loss = make_loss(cfg)(logits, feats, batch["pids"][part])
    loss.backward()
    total = distributed.sum_over_ranks([loss.item()], torch.device("cpu"))[0] / world
    if rank == 0:
        torch.save({"loss": total, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    gen = torch.Generator().manual_seed(1)
    batch = {"imgs": torch.randn(8, 3, 64, 32, generator=gen), "pids": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
             "cams": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    ddp_step(0, 1, 0, batch, str(tmp_path / "single.pt"))
    mp.spawn(ddp_step, args=(2, 29500 + os.getpid() % 1000, batch, str(tmp_path / "ddp.pt")), nprocs=2)
    single, ddp = (torch.load(tmp_path / f, weights_only=True) for f in ("single.pt", "ddp.pt"))
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)  # mean over ranks of (local id + global triplet)
    assert set(single["grads"]) == set(ddp["grads"])
    for name, g in single["grads"].items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_transreid_state_dict_with_its_imagenet_head_loads(tmp_path, prefix):
    """What TransReID's train loop saves: a bare state dict with its own neck names and base.fc.* (the unused
    1000-way head its backbone always builds), under DataParallel also `module.`-prefixed."""
    cfg = load_config(TINY_CFG, [])
    torch.manual_seed(0)
    model = tr.make_model(cfg, 5, 3).eval()
    names = {"bottlenecks.0.": "bottleneck.", "classifiers.0.": "classifier.",
             **{f"{n}s.{i}.": f"{n}_{i}." for n in ("bottleneck", "classifier") for i in range(1, 5)}}
    official = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        official[prefix + key] = value
    official[prefix + "base.fc.weight"], official[prefix + "base.fc.bias"] = torch.randn(1000, 64), torch.zeros(1000)
    torch.save(official, tmp_path / "transformer_120.pth")
    torch.save(tr.checkpoint(model), tmp_path / "ours.pth")
    x, cams = torch.randn(3, 3, 64, 32), torch.tensor([0, 1, 2])
    feats = []
    for name in ("transformer_120.pth", "ours.pth"):
        rebuilt = tr.model_from_checkpoint(cfg, tr.read_reid_checkpoint(tmp_path / name), tmp_path / name).eval()
        with torch.no_grad():
            feats.append(rebuilt(x, cams))
    assert torch.equal(feats[0], feats[1])


def test_outputs_never_replace_the_checkpoint_or_an_existing_file(tiny_transreid_run, synthetic_occ_duke, tmp_path):
    weight = tiny_transreid_run / "transformer_2.pth"
    digest = weight.read_bytes()
    (tmp_path / "old.json").write_text("{}")
    common = ["--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke, "TEST.WEIGHT", weight]
    for args, words in ((["--mat", weight], "is TEST.WEIGHT"), (["--json", tmp_path / "old.json"], "--overwrite"),
                        (["--mat", tmp_path], "is a folder")):
        r = run_script("-m transreid.test", *common, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (args, r.stderr)
    assert weight.read_bytes() == digest and (tmp_path / "old.json").read_text() == "{}"
    r = run_script("-m transreid.test", *common, "--json", tmp_path / "old.json", "--overwrite")
    assert r.returncode == 0 and "mAP" in json.loads((tmp_path / "old.json").read_text())


@pytest.mark.parametrize("text,opts,words", [
    ("- a\n- b\n", [], "top level, not a list"),
    (None, ["MODEL.STRIDE_SIZE", "[20, 8]"], "must not exceed the 16-pixel patch"),
    (None, ["INPUT.PADDING", "-1"], "INPUT.PADDING"), (None, ["SOLVER.SEED", "-5"], "SOLVER.SEED"),
    (None, ["INPUT.SIZE_TEST", "[128, 64]"], "gives a 15x7 patch grid"),
    (None, ["MODEL.DEVIDE_LENGTH", "30"], "smaller than the 21 patch tokens"),
    (None, ["MODEL.SHIFT_NUM", "21"], "smaller than the 21 patch tokens")])
def test_config_values_out_of_range_are_refused(tmp_path, text, opts, words):
    path = TINY_CFG
    if text is not None:
        path = tmp_path / "c.yml"
        path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(str(path), opts)


def test_every_shipped_config_is_valid():
    from pathlib import Path
    files = sorted(Path("transreid/configs").glob("*/*.yml"))
    assert len(files) >= 17
    for f in files:
        load_config(str(f), [])
