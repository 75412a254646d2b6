"""INT8 TransReID (transreid.quantize, transreid.runtime --int8) on the tiny configs and the synthetic
Occluded-Duke: the float32 export equals PyTorch, INT8 stays close in features and mAP, pruned structure
survives the export, the table is complete, and mistakes are one-line errors that write nothing."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_ATTN, TINY_CFG, TINY_HEAD, run_script

pytest.importorskip("onnxruntime")

COLUMNS = {"model", "file", "params", "macs", "size_mb", "cosine", "mAP", "R1", "mINP", "onnx_vs_pytorch",
           "ms_b1", "ms_b4", "speedup_b1", "speedup_b4", "mac_ratio"}
FAST = ["--batch_sizes", "1,4", "--repeats", "1", "--warmup", "0"]


def qkv_widths(path) -> list[int]:
    """Output widths of the qkv weights in a tiny model's ONNX file: [64, 3 x 16 x heads] MatMul initializers
    (the tiny model: dim 64, head width 16; its fc1 is [64, 128] and proj [16 x heads, 64])."""
    dims = [list(t.dims) for t in onnx.load(str(path)).graph.initializer]
    return sorted(d[1] for d in dims if len(d) == 2 and d[0] == 64 and d[1] % 48 == 0)


@pytest.fixture(scope="module")
def int8_table(amg_runs, tiny_transreid_run, tmp_path_factory):
    root, data = amg_runs
    out = tmp_path_factory.mktemp("int8") / "out"
    r = run_script("-m transreid.quantize", "--config_file", TINY_HEAD, *data, "TEST.WEIGHT",
                   root / "head" / "best.pth", "--unpruned", tiny_transreid_run / "transformer_2.pth", "--out", out,
                   *FAST)
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "quantization.json").read_text()), r.stdout


def test_int8_rows_are_complete_and_close_to_float32(int8_table):
    out, rows, stdout = int8_table
    assert [r["model"] for r in rows] == ["unpruned float32", "unpruned INT8 dynamic", "pruned float32",
                                          "pruned INT8 dynamic"]
    assert all(COLUMNS <= set(r) for r in rows)
    for fp32, q in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert fp32["onnx_vs_pytorch"] <= 1e-4 and fp32["cosine"] == pytest.approx(1.0)
        assert q["cosine"] >= 0.99
        assert abs(q["mAP"] - fp32["mAP"]) <= 0.02
        assert q["size_mb"] < fp32["size_mb"]
        assert (out / q["file"]).is_file() and (out / fp32["file"]).is_file()
    assert rows[2]["macs"] < rows[0]["macs"] and rows[2]["params"] < rows[0]["params"]  # heads really removed
    assert "pruned INT8 dynamic" in stdout and (out / "quantization.csv").is_file()


def test_pruned_structure_survives_the_export(int8_table, amg_runs):
    out, rows, _ = int8_table
    ckpt = torch.load(amg_runs[0] / "head" / "best.pth", weights_only=True)
    # the prunable blocks (the last backbone block only seeds JPM's branches, which keep all heads)
    widths = sorted([48 * h for h in ckpt["heads"][:-1]] + [192, 192])
    assert qkv_widths(out / "fp32.onnx") == widths and qkv_widths(out / "unpruned_fp32.onnx") == [192] * 5
    assert widths != [192] * 5


def test_float32_onnx_features_score_like_transreid_test(int8_table, amg_runs, tmp_path):
    out, rows, _ = int8_table
    root, data = amg_runs
    r = run_script("-m transreid.test", "--config_file", TINY_HEAD, *data, "TEST.WEIGHT", root / "head" / "best.pth",
                   "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert rows[2]["mAP"] == pytest.approx(metrics["mAP"], abs=1e-4)
    assert rows[2]["mINP"] == pytest.approx(metrics["mINP"], abs=1e-4)


def test_static_mode_calibrates_on_training_images(amg_runs, tmp_path):
    root, data = amg_runs
    r = run_script("-m transreid.quantize", "--config_file", TINY_ATTN, *data, "TEST.WEIGHT",
                   root / "attn" / "best.pth", "--mode", "static", "--calib_images", "32", "--out", tmp_path / "s",
                   *FAST)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "s" / "quantization.json").read_text())
    assert [r["model"] for r in rows] == ["pruned float32", "pruned INT8 static (QDQ)"]
    assert rows[1]["cosine"] >= 0.99 and abs(rows[1]["mAP"] - rows[0]["mAP"]) <= 0.02
    graph = onnx.load(str(tmp_path / "s" / rows[1]["file"])).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    ops = {n.op_type for n in graph.node}
    assert {"LayerNormalization", "Softmax", "Erf"} <= ops and not any(op.startswith("QLinear") for op in ops)
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and all(made_by.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)


def test_mistakes_are_one_line_and_write_nothing(int8_table, amg_runs, tiny_transreid_run, tmp_path):
    out, _, _ = int8_table
    root, data = amg_runs
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    pruned, unpruned = root / "head" / "best.pth", tiny_transreid_run / "transformer_2.pth"
    cases = [(["TEST.WEIGHT", pruned, "--out", out], "already holds results"),
             (["TEST.WEIGHT", unpruned, "--unpruned", unpruned, "--out", tmp_path / "a"], "is not pruned"),
             (["TEST.WEIGHT", pruned, "--unpruned", pruned, "--out", tmp_path / "b"], "is a pruned model"),
             (["TEST.WEIGHT", pruned, "--calib_images", "8", "--out", tmp_path / "c"], "for --mode static"),
             (["TEST.WEIGHT", pruned, "--out", root / "head"], "input checkpoints"),
             (["TEST.WEIGHT", tmp_path / "none.pth", "--out", tmp_path / "d"], "does not exist")]
    for args, words in cases:
        r = run_script("-m transreid.quantize", "--config_file", TINY_HEAD, *data, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0] and len(lines[0]) <= 300, (args, r.stderr)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_missing_onnxruntime_is_one_line(monkeypatch, amg_runs, tmp_path):
    from toolkit import int8
    from transreid import quantize
    monkeypatch.setattr(int8, "onnx_available", lambda dynamo_exporter=True: False)
    root, data = amg_runs
    args = quantize.get_parser().parse_intermixed_args(["--config_file", TINY_HEAD, *map(str, data), "TEST.WEIGHT",
                                                        str(root / "head" / "best.pth"), "--out", str(tmp_path / "o")])
    with pytest.raises(int8.QuantizationError, match="needs onnxruntime"):
        quantize.main(args)
    assert not (tmp_path / "o").exists()


def test_runtime_int8_rows(amg_runs, tmp_path):
    root, data = amg_runs
    r = run_script("-m transreid.runtime", "--config_file", TINY_HEAD, "--checkpoint",
                   f"amg={root / 'head' / 'best.pth'}", "--int8", "--batch_sizes", "1", "--repeats", "1",
                   "--warmup", "0", "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["model"] for r in rows] == ["amg", "amg (onnxruntime)", "amg int8 (onnxruntime)"]
    assert rows[2]["size_mb"] < rows[1]["size_mb"] and rows[2]["macs"] == rows[0]["macs"]
    assert np.isfinite([r["ms_b1"] for r in rows]).all() and rows[2]["amg_ratio"] == 1.0
    bad = run_script("-m transreid.runtime", "--config_file", TINY_CFG, "--int8", "--no_onnx")
    assert bad.returncode == 2 and "--no_onnx" in bad.stderr
    twice = [f"amg={root / 'head' / 'best.pth'}"] * 2
    bad = run_script("-m transreid.runtime", "--config_file", TINY_HEAD, "--checkpoint", twice[0], "--checkpoint",
                     twice[1])
    assert bad.returncode == 2 and "names 'amg' twice" in bad.stderr
