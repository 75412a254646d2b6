"""One error base class and one run_main for every entry point: one `error:` line of at most 300 characters,
exit 2; torch's disk-full and pickle failures translated; a real bug still shows its traceback."""
import pickle

import pytest
from conftest import run_script

from toolkit import errors


def test_every_package_error_is_a_user_error():
    import classification.engine
    import model
    import pruner
    from toolkit import cli, layouts, train_loop
    from toolkit.int8 import QuantizationError
    from toolkit.ranking import EvaluationError
    from transreid.config import ConfigError
    from transreid.processor import RunError
    for kind in (cli.UsageError, layouts.DatasetError, model.ModelError, pruner.PruneError,
                 train_loop.TrainingError, classification.engine.TrainingError, EvaluationError, QuantizationError,
                 ConfigError, RunError):
        assert issubclass(kind, errors.UserError), kind


@pytest.mark.parametrize("raised,words", [
    (errors.UserError("x" * 400), "x" * 200),
    (RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: "
                  "file write failed"), "the disk is full"),
    (pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` "
                            "will likely succeed"), "could not be read safely"),
    (OSError(28, "No space left on device", "results/net_3.pth"), "results/net_3.pth: No space left on device"),
    (errors.UserError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                      "last):\n  File \"x.py\"\ndataset_layout.DatasetError: cannot read image a.jpg"),
     "cannot read image a.jpg"),
])
def test_run_main_prints_one_short_line(capsys, raised, words):
    def main(_):
        raise raised
    with pytest.raises(SystemExit) as stop:
        errors.run_main(main, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert len(lines[0]) <= len("error: ") + 300 and "weights_only" not in lines[0]


def test_a_bug_is_not_hidden():
    def main(_):
        raise RuntimeError("shape mismatch in some kernel")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        errors.run_main(main, None)


@pytest.mark.parametrize("script,args", [("make_synthetic_data.py", ["--out", "/dev/null/x"]),
                                         ("evaluate_gpu.py", ["--mat", "/dev/null/x.mat", "--rerank"])])
def test_entry_points_that_had_their_own_handling(script, args):
    r = run_script(script, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr


@pytest.mark.parametrize("script,args", [
    ("APFP_train.py", ["--name", "x", "--data_dir", "/nonexistent"]),
    ("-m transreid.train", ["--config_file", "transreid/configs/OCC_Duke/tiny.yml", "OUTPUT_DIR", "@RUN@"]),
    ("-m transreid.finetune", ["--config_file", "transreid/configs/OCC_Duke/tiny_attn.yml", "OUTPUT_DIR", "@RUN@"]),
    ("-m classification.pruning_cifar10_resnet", ["/nonexistent", "--arch", "resnet20", "--save_path", "@RUN@",
                                                  "--resume", "@RUN@/checkpoint.pth"]),
])
def test_resume_and_overwrite_together_is_an_error_in_every_trainer(tmp_path, script, args):
    args = [a.replace("@RUN@", str(tmp_path / "run")) for a in args]
    flags = ["--overwrite"] + (["--resume"] if "classification" not in script else [])
    r = run_script(script, *args, *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "give one" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
