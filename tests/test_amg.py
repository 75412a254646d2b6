"""AMG (transreid.amg, transreid.finetune): physical head removal and token skipping against their masked
forms, the token score against autograd, entropies, selection on hand-worked cases, the FLOPs formula
against flop_counter, tiny runs with resume, checkpoint round trip, ONNX export of a pruned model."""
import math

import pytest
import torch
from conftest import TINY_ATTN, TINY_CFG, TINY_HEAD, run_script

from transreid import amg
from transreid import model as tr
from transreid.config import load_config


def tiny_model(jpm=True, seed=0) -> tr.TransReID:
    torch.manual_seed(seed)
    m = tr.TransReID(5, 3, "vit_tiny_TransReID", (64, 32), (8, 8), jpm=jpm, sie_camera=True, drop_path_rate=0.0)
    for p in m.parameters():  # larger weights than the init so that every head matters
        p.data.normal_(0, 0.2)
    return m


def gated_attention(attn: tr.Attention, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The unpruned module with the dropped heads' outputs set to zero before proj."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v  # [b, heads, n, hd]
    out = out * keep.view(1, -1, 1, 1)
    return attn.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_physical_head_removal_equals_gating_heads_to_zero():
    model = tiny_model().eval()
    attn = model.base.blocks[1].attn
    x = torch.randn(2, 22, 64)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        expected = gated_attention(attn, x, keep)
        amg.remove_heads(attn, keep)
        assert attn.heads == 2 and attn.qkv.weight.shape == (3 * 2 * 16, 64) and attn.proj.weight.shape == (64, 32)
        assert (attn(x) - expected).abs().max() < 1e-5
        attn.fused = True
        assert (attn(x) - expected).abs().max() < 1e-5


def masked_block(blk: tr.Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The masked formulation on the full sequence: kept tokens attend only to kept tokens, skipped tokens
    get no update."""
    a = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
    scores = (q * a.scale) @ k.transpose(-2, -1)
    scores = scores.masked_fill(~keep.view(1, 1, 1, n), float("-inf"))
    y = x + a.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
    y = y + blk.mlp(blk.norm2(y))
    return torch.where(keep.view(1, n, 1), y, x)


def test_token_skipping_equals_masked_attention_and_all_keep_equals_unpruned():
    model = tiny_model().eval()
    blk = model.base.blocks[0]
    x = torch.randn(2, 22, 64)
    keep = torch.rand(22, generator=torch.Generator().manual_seed(0)) > 0.4
    keep[0] = True
    with torch.no_grad():
        expected = masked_block(blk, x, keep)
        blk.keep = torch.nonzero(keep).flatten()
        assert (blk(x) - expected).abs().max() < 1e-5
        blk.keep = None
        imgs, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 2])
        full = model(imgs, cams)
        amg.apply_token_masks(model, [torch.ones(21, dtype=torch.bool)] * 3)
        amg.apply_head_masks(model, [torch.ones(4, dtype=torch.bool)] * 3)
        assert model.token_keep() is None and torch.equal(model(imgs, cams), full)


def batch_loss(model, imgs, cams, pids, cfg):
    from transreid.loss import make_loss
    logits, feats = model(imgs, cams)
    return make_loss(cfg)(logits, feats, pids)


def test_token_score_hook_equals_autograd_of_the_attention_maps():
    cfg = load_config(TINY_CFG, [])
    model = tiny_model()
    model.train()
    amg.apply_token_masks(model, [torch.arange(21) % 3 != 1, torch.ones(21, dtype=torch.bool),
                                  torch.arange(21) < 15])
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 64, 32, generator=gen), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 1]))
               for _ in range(2)]
    scorer = amg.TokenScorer(model)
    for imgs, cams, pids in batches:
        (1024.0 * batch_loss(model, imgs, cams, pids, cfg)).backward()  # a loss scale: ignored by selection
    scorer.detach()
    hooked = scorer.patch_scores()

    expected = [torch.zeros(22, dtype=torch.float64) for _ in range(3)]
    for imgs, cams, pids in batches:
        maps = []
        for blk in model.prunable_blocks:
            blk.attn.recorder = maps.append
        loss = 1024.0 * batch_loss(model, imgs, cams, pids, cfg)
        for blk in model.prunable_blocks:
            blk.attn.recorder = None
        grads = torch.autograd.grad(loss, maps)
        for layer, (a, g) in enumerate(zip(maps, grads)):
            b, h, nq, _ = a.shape
            per_key = (a.double() * g.double()).sum((0, 1, 2)).abs() / (b * h * nq)
            positions = model.prunable_blocks[layer].keep
            positions = torch.arange(22) if positions is None else positions
            expected[layer][positions] += per_key
    for got, want in zip(hooked, expected):
        assert torch.allclose(got, want[1:], rtol=1e-6, atol=1e-12)
    assert hooked[0][1] == 0 and hooked[2][-1] == 0 and hooked[0][0] > 0  # tokens a layer does not process score 0
    same = zip(amg.select_tokens(hooked, 9), amg.select_tokens([s / 1024.0 for s in hooked], 9))
    assert all(torch.equal(a, b) for a, b in same)


def test_head_entropy_of_hand_made_maps():
    uniform = torch.full((2, 3, 8), 1 / 8)
    assert torch.allclose(amg.head_entropy(uniform), torch.full((2,), 3.0))
    one_hot = torch.zeros(1, 3, 8)
    one_hot[0, torch.arange(3), torch.tensor([0, 5, 7])] = 1
    assert amg.head_entropy(one_hot).item() == 0
    half = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    assert amg.head_entropy(half).item() == pytest.approx(0.5)  # rows of 1 and 0 bits


def test_select_tokens_hand_worked():
    l0, l1 = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    # normalised and weighted: l0 [0.6, 0.8, 0], l1 0.985 x [0, 0.6, 0.8] = [0, 0.591, 0.788]
    assert [m.tolist() for m in amg.select_tokens([l0, l1], 3)] == [[True, True, False], [False, False, True]]
    assert [m.tolist() for m in amg.select_tokens([l0, l1], 2)] == [[True, True, False], [False, True, True]]
    assert [m.tolist() for m in amg.select_tokens([l0, l1], 0)] == [[True] * 3, [True] * 3]
    # ties at the threshold are kept: layer 1's three equal values are the 1st-3rd smallest
    same = [torch.ones(3), torch.ones(3)]
    assert all(m.all() for m in amg.select_tokens(same, 2))
    # an all-zero layer: its zeros tie at t = 0 and are all kept
    assert all(m.all() for m in amg.select_tokens([torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])], 2))
    # l0 [0, 0.447, 0.894], l1 0.985 x [0.267, 0.535, 0.802]; a second round removes among the slots still kept
    scores = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])]
    first = amg.select_tokens(scores, 2)
    assert [m.tolist() for m in first] == [[False, True, True], [False, True, True]]
    second = amg.select_tokens(scores, 2, first)
    assert [m.tolist() for m in second] == [[False, False, True], [False, False, True]]
    with pytest.raises(ValueError):
        amg.select_tokens([torch.ones(2)], 2)


def test_select_heads_hand_worked():
    e = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.5]), torch.tensor([5.0])]
    # weighted: layer 0 x 1, layer 1 x 1.005 = [3.015, 0.5025]; layer 2 has one head and takes no part
    assert [m.tolist() for m in amg.select_heads(e, 1)] == [[True, True, True], [False, True], [True]]
    assert [m.tolist() for m in amg.select_heads(e, 2)] == [[True, True, False], [False, True], [True]]
    # t = 1.0 would empty layer 0: its lowest-entropy head stays
    assert [m.tolist() for m in amg.select_heads(e, 4)] == [[True, False, False], [False, True], [True]]
    # ties at t remove more
    assert [m.tolist() for m in amg.select_heads([torch.tensor([2.0, 2.0, 1.0])], 1)] == [[False, False, True]]
    assert [m.tolist() for m in amg.select_heads(e, 0)] == [[True] * 3, [True] * 2, [True]]


def test_prune_counts_round_down():
    model = tr.TransReID(5, 0, "vit_base_patch16_224_TransReID", (256, 128), (12, 12), jpm=True)
    assert amg.prune_counts(model, "attn", 0.25) == int(210 * 11 * 0.25) == 577
    assert amg.prune_counts(model, "heads", 0.15) == int(12 * 11 * 0.15) == 19
    assert amg.split_over_rounds(19, 19) == [1] * 19 and amg.split_over_rounds(7, 3) == [3, 2, 2]


def test_amg_macs_formula_against_flop_counter_and_the_paper():
    from torch.utils.flop_counter import FlopCounterMode
    assert round(amg.amg_macs([211] * 11, [12] * 11, 768, 3072, 64) / 1e9, 2) == 17.19
    assert round(amg.amg_macs([243] * 11, [12] * 11, 768, 3072, 64) / 1e9, 2) == 19.92
    assert round(amg.amg_macs([243] * 7, [8] * 7, 768, 2304, 96) / 1e9, 2) == 10.67
    model = tiny_model().eval()
    amg.apply_token_masks(model, [torch.arange(21) % 2 == 0, torch.arange(21) < 17, torch.ones(21, dtype=torch.bool)])
    amg.apply_head_masks(model, [torch.tensor([True, True, False, True]), torch.tensor([False, True, False, False]),
                                 torch.ones(4, dtype=torch.bool)])
    counter = FlopCounterMode(display=False)
    x = torch.randn(1, 22, 64)
    with counter, torch.no_grad():
        for blk in model.prunable_blocks:
            x = blk(x)
    tokens = [1 + 11, 1 + 17, 22]
    heads = [3, 1, 4]
    softmax_terms = sum(h * n * n for h, n in zip(heads, tokens))  # not a matmul: FlopCounterMode skips it
    assert counter.get_total_flops() // 2 + softmax_terms == amg.amg_macs(tokens, heads, 64, 128, 16)
    assert amg.model_amg_macs(model) == amg.amg_macs(tokens, heads, 64, 128, 16)


def test_checkpoint_round_trip_rebuilds_identical_features(tmp_path):
    cfg = load_config(TINY_CFG, [])
    model = tr.make_model(cfg, 5, 3).eval()
    amg.apply_token_masks(model, [torch.arange(21) % 3 != 0] * 3)
    amg.apply_head_masks(model, [torch.tensor([True, False, True, True])] * 3)
    torch.save(tr.checkpoint(model), tmp_path / "pruned.pth")
    ckpt = tr.read_reid_checkpoint(tmp_path / "pruned.pth")
    assert ckpt["heads"] == [3, 3, 3, 4] and ckpt["channels"] == [15, 15, 15]
    rebuilt = tr.model_from_checkpoint(cfg, ckpt, tmp_path / "pruned.pth").eval()
    x, cams = torch.randn(3, 3, 64, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, cams), model(x, cams))
    assert tr.model_from_checkpoint(cfg, ckpt, "x").feature_params() < tr.make_model(cfg, 5, 3).feature_params()


def test_tiny_token_then_head_runs(amg_runs):
    root, data = amg_runs
    attn = torch.load(root / "attn" / "last.pth", weights_only=True)
    assert attn["heads"] == [4, 4, 4, 4]
    assert sum(22 - c for c in attn["channels"]) == int(21 * 3 * 0.25)  # no ties on real scores
    head = torch.load(root / "head" / "last.pth", weights_only=True)
    assert sum(4 - h for h in head["heads"][:3]) == int(4 * 3 * 0.25) and head["heads"][3] == 4
    assert head["tokens"] == attn["tokens"]  # the second run keeps the first run's token sets
    best = torch.load(root / "head" / "best.pth", weights_only=True)
    assert best["chosen_on"] == "test set mAP" and 0 <= best["metrics"]["mAP"] <= 1
    log = (root / "head" / "log.txt").read_text()
    assert "heads per layer [4, 4, 4]" in log.splitlines()[1] and "AMG GFLOPs" in log and "GMACs measured" in log
    r = run_script("-m transreid.test", "--config_file", TINY_HEAD, *data, "TEST.WEIGHT", root / "head" / "last.pth")
    assert r.returncode == 0, r.stderr
    assert f"mAP {100 * head['metrics']['mAP']:.1f}" in r.stdout


def test_finetune_resume_equals_uninterrupted(amg_runs, tiny_transreid_run):
    root, data = amg_runs
    common = ["--config_file", TINY_ATTN, *data, "FINETUNE.PRETRAIN_PATH", tiny_transreid_run / "transformer_2.pth",
              "OUTPUT_DIR", root / "attn_resumed"]
    r = run_script("-m transreid.finetune", *common, "--stop_after_step", "2")  # after round 2's scoring
    assert r.returncode == 0 and not (root / "attn_resumed" / "last.pth").exists(), r.stderr
    r = run_script("-m transreid.finetune", *common, "--resume")
    assert r.returncode == 0, r.stderr
    a = torch.load(root / "attn_resumed" / "last.pth", weights_only=True)
    b = torch.load(root / "attn" / "last.pth", weights_only=True)
    assert a["tokens"] == b["tokens"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_onnx_export_of_a_pruned_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from toolkit.onnx_export import export_onnx, onnx_max_difference
    model = tiny_model().eval()
    amg.apply_token_masks(model, [torch.arange(21) % 2 == 0] * 3)
    amg.apply_head_masks(model, [torch.tensor([True, False, True, False])] * 3)
    path = export_onnx(model, tmp_path / "pruned.onnx", (64, 32), dynamo=False)
    difference = onnx_max_difference(model, path, (64, 32))
    assert math.isfinite(difference) and difference < 1e-4


def test_finetune_refuses_a_wrong_start(tmp_path, synthetic_occ_duke):
    r = run_script("-m transreid.finetune", "--config_file", TINY_ATTN, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "FINETUNE.PRETRAIN_PATH", tmp_path / "none.pth", "OUTPUT_DIR", tmp_path / "out")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
