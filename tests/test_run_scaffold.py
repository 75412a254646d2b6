"""The run scaffold shared by the three trainers (toolkit.run): all-or-nothing --overwrite, the resume
policy, the checkpointer and the non-finite checks, and one error line under torchrun."""
import shutil

import pytest
import torch
from conftest import TINY_CFG, make_args, run_script
from test_distributed import torchrun

from toolkit import losses, train_loop
from toolkit.run import (
    RunError,
    RunFolder,
    check_finite_state,
    check_same_run,
    first_nonfinite,
    load_resume,
    save_resume,
    state_dict_mismatch,
)


def test_a_failed_overwrite_leaves_the_old_run_and_a_finished_one_replaces_it(synthetic_market, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "ft_resnet18" / "run"
    out.mkdir(parents=True)
    old = {"net_7.pth": "old weights", "opts.yaml": "old: 1\n", "log.csv": "epoch\n7\n", "notes.txt": "mine"}
    for name, text in old.items():
        (out / name).write_text(text)
    args = make_args(synthetic_market, tmp_path, Epochs=1, overwrite=True)
    real = losses.batch_loss
    monkeypatch.setattr(losses, "batch_loss", lambda *a, **k: (lambda r: (r[0] * float("nan"), r[1]))(real(*a, **k)))
    with pytest.raises(RunError, match="the loss is nan"):
        train_loop.train(args)
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # untouched, not even an emptied log
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no staging folder left
    monkeypatch.setattr(losses, "batch_loss", real)
    train_loop.train(args)
    assert sorted(p.name for p in out.iterdir()) == ["log.csv", "net_last.pth", "opts.yaml", "resume.pth"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_folder(synthetic_market, tmp_path, monkeypatch):
    args = make_args(synthetic_market, tmp_path, Epochs=1)
    monkeypatch.setattr(losses, "batch_loss", lambda *a, **k: (_ for _ in ()).throw(RunError("stop")))
    with pytest.raises(RunError, match="stop"):
        train_loop.train(args)
    assert not (tmp_path / "ft_resnet18" / "run").exists()


def test_transreid_overwrite_holds_the_new_run_only(tiny_transreid_run, synthetic_occ_duke, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_transreid_run, out)
    assert (out / "transformer_2.pth").is_file()
    r = run_script("-m transreid.train", "--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1", "SOLVER.EVAL_PERIOD", "1", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.txt", "resume.pth", "transformer_1.pth"]
    assert (out / "log.txt").read_text().count("epoch 1/1") == 1


def test_folder_checks_come_before_anything_is_created(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resume.pth").write_text("x")
    with pytest.raises(RunError, match="already holds a run"):
        RunFolder(tmp_path / "run", resume=False, overwrite=False, markers=("resume.pth",))
    with pytest.raises(RunError, match="give one"):
        RunFolder(tmp_path / "run", resume=True, overwrite=True, markers=("resume.pth",))
    with pytest.raises(RunError, match="would delete"):
        RunFolder(tmp_path / "run", resume=False, overwrite=True, markers=("resume.pth",),
                  inputs=[tmp_path / "run" / "resume.pth"])
    folder = RunFolder(tmp_path / "new" / "deeper", resume=False, overwrite=False, markers=("resume.pth",))
    assert not (tmp_path / "new").exists()
    folder.append("log.txt", "before the folder")
    folder.start()
    folder.append("log.txt", "after")
    assert (tmp_path / "new" / "deeper" / "log.txt").read_text() == "before the folder\nafter\n"


def test_resume_compares_run_defining_values_and_resolves_paths(tmp_path):
    (tmp_path / "data").mkdir()
    saved = {"DATASETS.ROOT_DIR": str(tmp_path / "data"), "SOLVER.BASE_LR": 0.01, "OUTPUT_DIR": "a", "TEST.X": 1}
    same = {**saved, "DATASETS.ROOT_DIR": f"{tmp_path}//data/", "OUTPUT_DIR": "copied", "TEST.X": 2}
    check_same_run(saved, same, "run", free=("OUTPUT_DIR", "TEST."), path_keys=("DATASETS.ROOT_DIR",))
    with pytest.raises(RunError, match="SOLVER.BASE_LR is 0.1 but the run in run used 0.01"):
        check_same_run(saved, {**same, "SOLVER.BASE_LR": 0.1}, "run", free=("OUTPUT_DIR", "TEST."),
                       path_keys=("DATASETS.ROOT_DIR",))
    with pytest.raises(RunError, match="DATASETS.ROOT_DIR"):
        check_same_run(saved, {**same, "DATASETS.ROOT_DIR": str(tmp_path)}, "run", path_keys=("DATASETS.ROOT_DIR",))


def test_resume_reads_its_own_kind_of_file_only(tmp_path):
    save_resume({"model": {}, "optimizer": {}, "next_step": 3, "rng": [], "history": [], "best": {}},
                tmp_path / "resume.pth", "transreid.finetune")
    with pytest.raises(RunError, match="resume file of transreid.finetune, not of transreid.train"):
        load_resume(tmp_path / "resume.pth", "transreid.train", ("model", "optimizer", "epoch"))
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    with pytest.raises(RunError, match="holds no 'optimizer'"):
        load_resume(tmp_path / "weights.pth", "transreid.train", ("optimizer", "epoch"))
    state = load_resume(tmp_path / "resume.pth", "transreid.finetune", ("next_step",))
    assert state["next_step"] == 3 and state["kind"] == "transreid.finetune"


def test_non_finite_values_are_found_anywhere_in_a_checkpoint():
    state = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "steps": torch.arange(3)}
    assert first_nonfinite(state) == "model.b"
    assert first_nonfinite({"a": torch.ones(2), "ints": torch.arange(4), "x": 1.5}) is None
    with pytest.raises(RunError, match="model.b holds NaN or infinite"):
        check_finite_state(state, "checkpoint c.pth")


def test_state_dict_mismatch_names_keys_and_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(3), "extra": torch.zeros(1)}
    why = state_dict_mismatch(net, state)
    assert why == ("missing 2 key(s) such as 1.weight, 1.bias; unexpected 1 key(s) such as extra; 0.weight is [4, 2] "
                   "in the file but [3, 2] in the model")


def test_a_torchrun_mistake_is_printed_once_and_every_rank_exits_2(synthetic_occ_duke, tmp_path):
    res = torchrun("-m", "transreid.train", "--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "OUTPUT_DIR", tmp_path / "run", "MODEL.DIST_TRAIN", "True", "SOLVER.SEED", "-1")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: SOLVER.SEED must be an integer in [0, 2^32), got -1"]
    ours = [line for line in res.stderr.splitlines() if "File " in line and ".venv" not in line
            and "site-packages" not in line and "<frozen" not in line]
    assert ours == []  # torchrun adds its own ChildFailedError traceback; none comes from the project's code
    assert res.stderr.count("exitcode  : 2") == 2 and not (tmp_path / "run").exists()


def test_a_head_count_that_cannot_be_met_is_reported(tiny_transreid_run, synthetic_occ_duke, tmp_path):
    from conftest import TINY_HEAD
    out = tmp_path / "heads"
    r = run_script("-m transreid.finetune", "--config_file", TINY_HEAD, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "FINETUNE.PRETRAIN_PATH", tiny_transreid_run / "transformer_2.pth", "OUTPUT_DIR", out,
                   "FINETUNE.PRUNE_MODE", "random", "FINETUNE.PRUNE_RATE", "0.95", "FINETUNE.ITER_NUM", "1",
                   "--stop_after_step", "0")
    assert r.returncode == 0, r.stderr
    # 3 prunable layers of 4 heads: int(4 * 3 * 0.95) = 11 asked, but each layer keeps one head, so 9 go
    assert "asked to remove 11 heads but only 9 could go" in (out / "log.txt").read_text()
    assert torch.load(out / "resume.pth", weights_only=True)["model"]["heads"][:3] == [1, 1, 1]
