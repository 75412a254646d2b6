"""Mistakes and hostile files given to transreid/ and classification/, as a new user makes them: every one
is a single `error: ...` line (at most 300 characters) with exit status 2, never a traceback, and nothing
on disk is created, written or overwritten."""
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import ROOT, TINY_ATTN, TINY_CFG, TINY_HEAD, mistake_problems

from classification.synthetic import write_cifar10, write_imagenet


def nan_copy(src: Path, dst: Path, key: str | None = None) -> None:
    state = torch.load(src, weights_only=True)
    weights = state["state_dict"] if "state_dict" in state else state
    name = key or next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    torch.save(state, dst)


def truncated_copy(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def sfp_reference_checkpoint(path: Path, arch: str, classes: int) -> None:
    """What the SFP ImageNet code saves: {epoch, arch, state_dict, best_prec1, optimizer}, `module.` keys."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=classes)
    with torch.no_grad():
        net.layer1[0].conv1.weight[:3] = 0
    torch.save({"epoch": 3, "arch": arch, "best_prec1": 1.0, "optimizer": {},
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_transreid_run, amg_runs, synthetic_occ_duke):
    """Good runs of both packages and corrupt, foreign and non-finite files beside them."""
    from classification import pruning_cifar10_resnet as cifar_script
    root = tmp_path_factory.mktemp("packages")
    p = {"root": root, "occ": synthetic_occ_duke}
    # transreid: copies of the trained tiny run and of the token run
    shutil.copytree(tiny_transreid_run, root / "tr_run")
    shutil.copytree(amg_runs[0] / "attn", root / "ft_run")
    weight = root / "tr_run" / "transformer_2.pth"
    p.update(tr_run=root / "tr_run", ft_run=root / "ft_run", weight=weight)
    for name in ("tr_trunc", "tr_pickle"):
        shutil.copytree(tiny_transreid_run, root / name)
    truncated_copy(tiny_transreid_run / "resume.pth", root / "tr_trunc" / "resume.pth")
    torch.save(torch.nn.Linear(2, 2), root / "tr_pickle" / "resume.pth")
    nan_copy(weight, root / "tr_nan.pth", "base.blocks.0.attn.qkv.weight")
    truncated_copy(weight, root / "tr_trunc.pth")
    torch.save(torch.nn.Linear(2, 2), root / "object.pth")
    torch.save(torch.zeros(3), root / "tensor.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / "foreign.pth")
    (root / "existing.mat").write_text("an earlier result")
    (root / "a_file").write_text("not a folder")
    (root / "list.yml").write_text("- MODEL\n- INPUT\n")
    (root / "broken.yml").write_text("MODEL: [unclosed\n")
    (root / "q_out").mkdir()
    (root / "q_out" / "table.csv").write_text("an earlier result")
    # classification: CIFAR data, a 1-epoch SFP run, an ImageNet folder, reference-code files
    write_cifar10(root / "cifar", per_class=6, seed=0)
    shutil.copytree(root / "cifar", root / "cifar_copy")
    (root / "cifar_bad" / "cifar-10-batches-py").mkdir(parents=True)
    for f in (root / "cifar" / "cifar-10-batches-py").iterdir():
        truncated_copy(f, root / "cifar_bad" / "cifar-10-batches-py" / f.name)
    args = [str(root / "cifar"), "--arch", "resnet20", "--epochs", "1", "--batch_size", "16", "--rate", "0.7",
            "--workers", "0", "--save_path", str(root / "c_run")]
    cifar_script.main(cifar_script.get_args_parser().parse_args(args))
    ckpt = root / "c_run" / "checkpoint.pth"
    nan_copy(ckpt, root / "c_nan.pth")
    truncated_copy(ckpt, root / "c_trunc.pth")
    write_imagenet(root / "imagenet", n_classes=3, per_class=2, seed=0, size=40)
    (root / "no_train").mkdir()
    sfp_reference_checkpoint(root / "ref_r18.pth", "resnet18", 5)
    (root / "small_out").mkdir()
    (root / "small_out" / "small.pth").write_text("an earlier result")
    p.update(cifar=root / "cifar", c_run=root / "c_run", ckpt=ckpt, imagenet=root / "imagenet")
    return p


def cases(p: dict) -> list[tuple[str, str, list, str]]:
    """(case, script, argv, text expected in the error line)."""
    r = p["root"]
    data = ["DATASETS.ROOT_DIR", p["occ"]]
    train = ["--config_file", TINY_CFG, *data]
    new = ["OUTPUT_DIR", r / "tr_new"]
    test = ["--config_file", TINY_CFG, *data, "TEST.WEIGHT"]
    tune = ["--config_file", TINY_ATTN, *data, "OUTPUT_DIR", r / "ft_new", "FINETUNE.PRETRAIN_PATH"]
    head = ["--config_file", TINY_HEAD, *data, "OUTPUT_DIR", r / "ft_new", "FINETUNE.PRETRAIN_PATH", p["weight"]]
    cifar = [p["cifar"], "--arch", "resnet20", "--epochs", "1", "--batch_size", "16", "--workers", "0"]
    cnew = [*cifar, "--save_path", r / "c_new"]
    inet = [p["imagenet"], "-a", "resnet18", "--epochs", "1", "-b", "4", "-j", "0", "--image_size", "32",
            "--save_dir", r / "i_new"]
    TR, TE, FT, RT, QT = ("-m transreid.train", "-m transreid.test", "-m transreid.finetune", "-m transreid.runtime",
                          "-m transreid.quantize")
    CI, IN, OT = "-m classification.pruning_cifar10_resnet", "-m classification.pruning_train", \
        "-m classification.original_train"
    GS, IS = "-m classification.get_small", "-m classification.infer_small"
    return [
        # transreid.train: config files and values
        ("config missing", TR, ["--config_file", r / "none.yml", *new], "none.yml"),
        ("config not a mapping", TR, ["--config_file", r / "list.yml", *new], "mapping"),
        ("config not YAML", TR, ["--config_file", r / "broken.yml", *new], "not valid YAML"),
        ("unknown key", TR, [*train, *new, "MODEL.NOPE", "1"], "MODEL.NOPE"),
        ("key without value", TR, [*train, *new, "SOLVER.BASE_LR"], "SOLVER.BASE_LR"),
        ("value of the wrong type", TR, [*train, *new, "SOLVER.MAX_EPOCHS", "abc"], "SOLVER.MAX_EPOCHS"),
        ("seed negative", TR, [*train, *new, "SOLVER.SEED", "-1"], "SOLVER.SEED"),
        ("padding above the crop", TR, [*train, *new, "INPUT.PADDING", "100"], "INPUT.PADDING"),
        ("test size off the grid", TR, [*train, *new, "INPUT.SIZE_TEST", "[128, 64]"], "INPUT.SIZE_TEST"),
        ("stride above the patch", TR, [*train, *new, "MODEL.STRIDE_SIZE", "[32, 32]"], "STRIDE_SIZE"),
        ("shift too large", TR, [*train, *new, "MODEL.SHIFT_NUM", "100"], "SHIFT_NUM"),
        ("devide length too large", TR, [*train, *new, "MODEL.DEVIDE_LENGTH", "100"], "DEVIDE_LENGTH"),
        ("base lr nan", TR, [*train, *new, "SOLVER.BASE_LR", "nan"], "SOLVER.BASE_LR"),
        ("batch 0", TR, [*train, *new, "SOLVER.IMS_PER_BATCH", "0"], "IMS_PER_BATCH"),
        ("epochs 0", TR, [*train, *new, "SOLVER.MAX_EPOCHS", "0"], "MAX_EPOCHS"),
        ("unknown dataset", TR, [*train, *new, "DATASETS.NAMES", "nowhere"], "DATASETS.NAMES"),
        ("missing dataset", TR, ["--config_file", TINY_CFG, "DATASETS.ROOT_DIR", r / "nothing", *new], "nothing"),
        ("empty OUTPUT_DIR", TR, [*train, "OUTPUT_DIR", ""], "OUTPUT_DIR"),
        ("OUTPUT_DIR is a file", TR, [*train, "OUTPUT_DIR", r / "a_file"], "a_file"),
        ("imagenet start without a file", TR, [*train, *new, "MODEL.PRETRAIN_CHOICE", "imagenet"], "PRETRAIN_PATH"),
        ("imagenet start missing", TR, [*train, *new, "MODEL.PRETRAIN_CHOICE", "imagenet", "MODEL.PRETRAIN_PATH",
                                        r / "vit.pth"], "vit.pth"),
        ("self start NaN", TR, [*train, *new, "MODEL.PRETRAIN_CHOICE", "self", "MODEL.PRETRAIN_PATH",
                                r / "tr_nan.pth"], "NaN"),
        ("self start a pickled object", TR, [*train, *new, "MODEL.PRETRAIN_CHOICE", "self", "MODEL.PRETRAIN_PATH",
                                             r / "object.pth"], "pickles Python objects"),
        # transreid.train: run folders and resumes
        ("existing run", TR, [*train, "OUTPUT_DIR", p["tr_run"]], "already holds a run"),
        ("resume and overwrite", TR, [*train, "OUTPUT_DIR", p["tr_run"], "--resume", "--overwrite"], "give one"),
        ("resume of nothing", TR, [*train, *new, "--resume"], "does not exist"),
        ("resume another config", TR, [*train, "OUTPUT_DIR", p["tr_run"], "--resume", "SOLVER.BASE_LR", "0.1"],
         "SOLVER.BASE_LR"),
        ("resume a fine-tuning run", TR, ["--config_file", TINY_ATTN, *data, "OUTPUT_DIR", p["ft_run"],
                                          "FINETUNE.PRETRAIN_PATH", r / "tr_run" / "transformer_2.pth", "--resume"],
         "FINETUNE.PRETRAIN_PATH"),
        ("resume truncated", TR, [*train, "OUTPUT_DIR", r / "tr_trunc", "--resume"], "corrupt"),
        ("resume pickled object", TR, [*train, "OUTPUT_DIR", r / "tr_pickle", "--resume"], "weights-only"),
        ("overwrite deleting the start", TR, [*train, "OUTPUT_DIR", p["tr_run"], "--overwrite",
                                              "MODEL.PRETRAIN_CHOICE", "self", "MODEL.PRETRAIN_PATH", p["weight"]],
         "would delete"),
        ("stop after 0", TR, [*train, *new, "--stop_after_epoch", "0"], "--stop_after_epoch"),
        # transreid.test
        ("test: weight missing", TE, [*test, r / "none.pth"], "none.pth"),
        ("test: weight empty", TE, [*test, ""], "TEST.WEIGHT"),
        ("test: weight truncated", TE, [*test, r / "tr_trunc.pth"], "corrupt"),
        ("test: weight NaN", TE, [*test, r / "tr_nan.pth"], "NaN"),
        ("test: weight a pickled object", TE, [*test, r / "object.pth"], "pickles Python objects"),
        ("test: weight a tensor", TE, [*test, r / "tensor.pth"], "tensor.pth"),
        ("test: weight of another model", TE, [*test, r / "foreign.pth"], "not a TransReID checkpoint"),
        ("test: weight of another arch", TE, [*test, p["weight"], "MODEL.TRANSFORMER_TYPE", "vit_small_TransReID"],
         "vit_small"),
        ("test: mat over the weight", TE, [*test, p["weight"], "--mat", p["weight"]], "TEST.WEIGHT"),
        ("test: existing mat", TE, [*test, p["weight"], "--mat", r / "existing.mat"], "--overwrite"),
        ("test: json is a folder", TE, [*test, p["weight"], "--json", r / "q_out"], "folder"),
        # transreid.finetune
        ("finetune: no start", FT, [*tune, ""], "FINETUNE.PRETRAIN_PATH"),
        ("finetune: start NaN", FT, [*tune, r / "tr_nan.pth"], "NaN"),
        ("finetune: start truncated", FT, [*tune, r / "tr_trunc.pth"], "corrupt"),
        ("finetune: rate 1", FT, [*tune, p["weight"], "FINETUNE.PRUNE_RATE", "1.0"], "PRUNE_RATE"),
        ("finetune: unknown mode", FT, [*tune, p["weight"], "FINETUNE.PRUNE_MODE", "tokens"], "PRUNE_MODE"),
        ("finetune: unknown distillation", FT, [*tune, p["weight"], "FINETUNE.DISTILL_TYPE", "kl"], "DISTILL_TYPE"),
        ("finetune: head ranks of text", FT, [*head, "FINETUNE.PRUNE_MODE", "head", "FINETUNE.HEAD_RANK",
                                              "[['a', 'b']]"], "HEAD_RANK"),
        ("finetune: head ranks of the wrong shape", FT, [*head, "FINETUNE.PRUNE_MODE", "head", "FINETUNE.ITER_NUM", "1",
                                                        "FINETUNE.HEAD_RANK",
                                                        "[[0.1, 0.2]]"],
         "HEAD_RANK has"),
        ("finetune: existing run", FT, ["--config_file", TINY_ATTN, *data, "OUTPUT_DIR", p["ft_run"],
                                        "FINETUNE.PRETRAIN_PATH", p["weight"]], "already holds a run"),
        ("finetune: resume a training run", FT, [*train, "OUTPUT_DIR", p["tr_run"], "FINETUNE.PRETRAIN_PATH",
                                                 p["weight"], "--resume"], "FINETUNE.PRETRAIN_PATH"),
        # transreid.runtime and transreid.quantize
        ("runtime: duplicate name", RT, ["--config_file", TINY_CFG, "--checkpoint", f"a={p['weight']}",
                                         "--checkpoint", f"a={p['weight']}"], "twice"),
        ("runtime: missing checkpoint", RT, ["--config_file", TINY_CFG, "--checkpoint", f"a={r / 'none.pth'}"],
         "none.pth"),
        ("runtime: batch sizes 0", RT, ["--config_file", TINY_CFG, "--batch_sizes", "0"], "--batch_sizes"),
        ("quantize: existing out", QT, [*test, p["weight"], "--out", r / "q_out"], "--overwrite"),
        ("quantize: calibration without static", QT, [*test, p["weight"], "--out", r / "q_new", "--calib_images",
                                                      "4"], "--calib_images"),
        ("quantize: weight missing", QT, [*test, r / "none.pth", "--out", r / "q_new"], "none.pth"),
        # classification: CIFAR
        ("cifar: rate above 1", CI, [*cnew, "--rate", "1.2"], "--rate"),
        ("cifar: rate 0", CI, [*cnew, "--rate", "0"], "--rate"),
        ("cifar: schedule and gammas", CI, [*cnew, "--schedule", "1", "2", "--gammas", "1"], "--gammas"),
        ("cifar: epochs 0", CI, [*cnew, "--epochs", "0"], "--epochs"),
        ("cifar: layer_inter 0", CI, [*cnew, "--layer_inter", "0"], "--layer_inter"),
        ("cifar: unknown arch", CI, [*cnew, "--arch", "resnet99"], "--arch"),
        ("cifar: unknown dataset", CI, [*cnew, "--dataset", "cifar100"], "--dataset"),
        ("cifar: gpu ids", CI, [*cnew, "--gpu_ids", "abc"], "--gpu_ids"),
        ("cifar: missing data", CI, [r / "nothing", "--save_path", r / "c_new"], "does not exist"),
        ("cifar: truncated batches", CI, [r / "cifar_bad", "--save_path", r / "c_new", "--workers", "0"],
         "cifar_bad"),
        ("cifar: pretrain without path", CI, [*cnew, "--use_pretrain"], "--pretrain_path"),
        ("cifar: existing run", CI, [*cifar, "--rate", "0.7", "--save_path", p["c_run"]], "already holds a run"),
        ("cifar: save path is a file", CI, [*cifar, "--save_path", r / "a_file"], "a_file"),
        ("cifar: resume and overwrite", CI, [*cifar, "--save_path", p["c_run"], "--resume", p["ckpt"],
                                             "--overwrite"], "give one"),
        ("cifar: resume truncated", CI, [*cnew, "--resume", r / "c_trunc.pth"], "corrupt"),
        ("cifar: resume a pickled object", CI, [*cnew, "--resume", r / "object.pth"], "pickles Python objects"),
        ("cifar: resume model_best", CI, [*cifar, "--rate", "0.7", "--save_path", p["c_run"], "--resume",
                                          p["c_run"] / "model_best.pth"], "optimiser"),
        ("cifar: resume another rate", CI, [*cifar, "--rate", "0.5", "--save_path", p["c_run"], "--resume",
                                            p["ckpt"]], "rate"),
        ("cifar: resume other data", CI, [r / "cifar_copy", "--arch", "resnet20", "--epochs", "2", "--rate", "0.7",
                                          "--workers", "0", "--save_path", p["c_run"], "--resume", p["ckpt"]],
         "data"),
        ("cifar: resume NaN", CI, [*cnew, "--resume", r / "c_nan.pth"], "NaN"),
        ("cifar: evaluate without resume", CI, [*cnew, "-e"], "--resume"),
        ("cifar: evaluate NaN", CI, [*cnew, "-e", "--resume", r / "c_nan.pth"], "NaN"),
        ("cifar: overwrite deleting the start", CI, [*cifar, "--save_path", p["c_run"], "--overwrite",
                                                     "--use_pretrain", "--pretrain_path", p["ckpt"]],
         "would delete"),
        # classification: ImageNet
        ("imagenet: no train folder", IN, [r / "no_train", "--save_dir", r / "i_new"], "does not exist"),
        ("imagenet: sparse flag without file", IN, [*inet, "--use_sparse"], "--sparse"),
        ("imagenet: pretrained without use_pretrain", IN, [*inet, "--pretrained", r / "ref_r18.pth"],
         "--use_pretrain"),
        ("imagenet: CIFAR arch", IN, [*inet, "-a", "resnet20"], "--arch"),
        ("imagenet: reference start of another arch", IN, [*inet, "-a", "resnet34", "--use_sparse", "--sparse",
                                                           r / "ref_r18.pth"], "resnet34"),
        ("imagenet: resume a reference file", IN, [*inet, "--resume", r / "ref_r18.pth"], "SFP reference code"),
        ("imagenet: rate above 1", IN, [*inet, "--rate", "1.5"], "--rate"),
        ("baseline: lr 0", OT, [*inet, "--lr", "0"], "--lr"),
        ("baseline: no data", OT, ["--save_dir", r / "i_new"], "data"),
        # classification.get_small and infer_small
        ("get_small: NaN", GS, ["--resume", r / "c_nan.pth", "--save_dir", r / "s_new"], "NaN"),
        ("get_small: existing small.pth", GS, ["--resume", p["ckpt"], "--save_dir", r / "small_out"], "--overwrite"),
        ("get_small: missing", GS, ["--resume", r / "none.pth", "--save_dir", r / "s_new"], "none.pth"),
        ("get_small: pickled object", GS, ["--resume", r / "object.pth", "--save_dir", r / "s_new"],
         "pickles Python objects"),
        ("get_small: foreign file", GS, ["--resume", r / "foreign.pth", "--save_dir", r / "s_new"], "foreign.pth"),
        ("get_small: onnx over the input", GS, ["--resume", p["ckpt"], "--save_dir", r / "s_new", "--export_onnx",
                                                p["ckpt"]], "input"),
        ("infer_small: missing", IS, [p["cifar"], "--small", r / "none.pth"], "none.pth"),
        ("infer_small: truncated", IS, [p["cifar"], "--small", r / "c_trunc.pth"], "corrupt"),
        ("infer_small: NaN", IS, [p["cifar"], "--small", r / "c_nan.pth"], "NaN"),
        ("infer_small: another dataset", IS, [p["imagenet"], "--small", r / "ref_r18.pth", "--workers", "0",
                                              "--image_size", "32"], "classifies 5 classes"),
    ]


def digest(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_package_mistakes_are_one_line_errors_and_write_nothing(world, tmp_path):
    all_cases = cases(world)
    assert len(all_cases) >= 100
    before = digest(world["root"])
    problems = mistake_problems(all_cases, ROOT, None, tmp_path)
    assert not problems, "\n".join(problems)
    after = digest(world["root"])
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files created or changed: {changed}"
