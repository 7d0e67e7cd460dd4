"""``scratchnn train`` and ``evaluate`` keep runs safe and refuse what they would ignore.

A new run never replaces one silently, a resume never shrinks one, a run that
fails to start leaves nothing behind, options a model would ignore are errors,
and the final summary names only the files written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_train import HAVE_DATA, needs_data, run_cli

from scratchnn.checkpoint import load_checkpoint, save_checkpoint
from scratchnn.cli import main
from scratchnn.data import find_dataset_files

SMALL = ["--hidden", "8", "--limit", "300", "--batch-size", "100"]


def stopped_after_an_epoch(fit: Any) -> Any:
    """``fit`` interrupted (as by Ctrl-C) right after the first epoch it trains has saved
    its checkpoint."""

    def interrupted(*args: Any, **kwargs: Any) -> None:
        def stop(epoch: int, history: Any) -> None:
            raise KeyboardInterrupt

        fit(*args, **{**kwargs, "callbacks": [*kwargs["callbacks"], stop]})

    return interrupted


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def trained_run(tmp_path: Path, *options: str) -> Path:
    """``tmp_path/run``, holding a small run of one epoch trained by ``scratchnn train``."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", *options, "--out", str(out)]) == 0
    return out


@needs_data
def test_a_new_run_does_not_replace_an_existing_one_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained_run(tmp_path)
    before = files_of(out)
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "2", "--seed", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert files_of(out) == before  # nothing touched
    assert (
        main(["train", *SMALL, "--epochs", "2", "--seed", "5", "--out", str(out), "--overwrite"])
        == 0
    )
    assert files_of(out)["checkpoint.safetensors"] != before["checkpoint.safetensors"]
    assert run_cli(["train", "--resume", "--overwrite", "--out", str(out)]) == 2


@needs_data
def test_resume_to_fewer_epochs_than_trained_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(tmp_path)]) == 0
    before = files_of(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "trained 2 epochs already, more than the 1 asked for" in err
    assert files_of(tmp_path) == before


def test_a_run_that_cannot_start_leaves_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    missing_data = ["--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "bad")]
    assert main(["train", *SMALL, *missing_data]) == 2
    assert "not found" in capsys.readouterr().err
    # Parents it had to create go too; one that was there stays.
    (tmp_path / "kept").mkdir()
    nested = ["--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "kept/a/b/c")]
    assert main(["train", *SMALL, *nested]) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["kept"]


def test_an_output_directory_that_is_a_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["train", *SMALL, "--out", str(afile)]) == 2
    assert f"the output directory {afile} is a file" in capsys.readouterr().err
    assert afile.read_text() == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dropout", "0.2"], "dropout applies to the cnn model only"),
        (["--channels", "8,8"], "--channels applies to the cnn model only"),
        (["--model", "cnn", "--activation", "tanh"], "does not apply to the cnn model"),
        (["--model", "cnn", "--init", "xavier"], "does not apply to the cnn model"),
        (["--model", "cnn", "--hidden", "128,64"], "one hidden Affine layer"),
        (["--hidden", "256,,128"], "expected sizes like 256,128"),
        (["--hidden", "256,"], "expected sizes like 256,128"),
        (["--seed", "-1"], "--seed: must be from 0"),
        (["--seed", "1.5"], "--seed: not an integer"),
    ],
)
def test_options_a_model_would_ignore_are_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["train", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


@needs_data
def test_the_summary_names_only_the_files_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scratchnn.plots

    def no_matplotlib(*args: object, **kwargs: object) -> None:
        raise RuntimeError("plots need matplotlib: pip install 'scratchnn[train]'")

    monkeypatch.setattr(scratchnn.plots, "plot_learning_curve", no_matplotlib)
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"wrote model.safetensors, checkpoint.safetensors, history.json, history.csv in {tmp_path}"
    )
    assert not (tmp_path / "learning_curve.png").exists()


@needs_data
def test_evaluate_takes_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "model.safetensors")]) == 0
    by_file = capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == by_file
    (tmp_path / "run" / "model.safetensors").unlink()  # a run cut short: its checkpoint
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == by_file
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run's directory" in err


@pytest.mark.parametrize("command", ["demo", "train"])
def test_a_closed_pipe_ends_the_command_quietly(command: str, tmp_path: Path) -> None:
    # `scratchnn demo | head -1`: the reader is gone before the command writes. (train's
    # one-line OS errors must not take a closed pipe for one.)
    if command == "train" and not HAVE_DATA:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    argv = ["demo"] if command == "demo" else [
        "train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "scratchnn", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


WITHOUT_KERNELS = (
    # A None in sys.modules makes the import fail as a missing extension module does.
    "import sys; sys.modules['scratchnn._ckernels'] = None; "
    "from scratchnn.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def test_version_says_whether_the_compiled_kernels_are_used() -> None:
    def version(code: str, **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # The version is the one pyproject.toml gives the package.
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (number,) = re.findall(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    with_kernels = "import sys; from scratchnn.cli import main; raise SystemExit(main(sys.argv[1:]))"
    from scratchnn import _fused

    if _fused.available():  # (SCRATCHNN_REQUIRE_KERNELS=0 runs the suite without them)
        assert version(with_kernels, SCRATCHNN_KERNELS="") == f"scratchnn {number} (compiled kernels: on)"
        assert version(with_kernels, SCRATCHNN_KERNELS="off") == (
            f"scratchnn {number} (compiled kernels: off (SCRATCHNN_KERNELS=off))"
        )
    assert version(WITHOUT_KERNELS).startswith(
        f"scratchnn {number} (compiled kernels: not built (import of scratchnn._ckernels halted"
    )


@needs_data
def test_a_run_without_the_compiled_kernels_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_KERNELS, "train", *SMALL, "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "note: compiled kernels not built (" in done.stdout
    assert "the layers run their NumPy passes, several times slower" in done.stdout


@needs_data
def test_evaluate_says_when_the_weights_are_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.checkpoint import load_model, save_model

    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path)]) == 0
    params, config = load_model(tmp_path / "model.safetensors")
    params["W1"][0, 0] = np.nan  # what a diverged run leaves
    save_model(tmp_path / "diverged.safetensors", params, config)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "diverged.safetensors")]) == 0
    captured = capsys.readouterr()
    # W1[0, 0] reaches every score: no accuracy, rather than a count of NaN rows as class 0.
    assert captured.out.startswith("test accuracy: none, the scores hold NaN")
    note = captured.err.strip()
    assert len(note.splitlines()) == 1
    assert note.startswith("scratchnn evaluate: note: ") and "weights W1 hold NaN" in note
    assert main(["evaluate", str(tmp_path / "model.safetensors")]) == 0
    assert capsys.readouterr().err == ""  # sound weights: no note


def test_train_options_are_never_abbreviated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # scripts/run.sh adds --overwrite unless it sees --resume: "--resu" must not mean it.
    with pytest.raises(SystemExit) as info:
        main(["train", "--resu", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "unrecognized arguments: --resu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_history_json_is_strict_json_and_reads_back() -> None:
    from scratchnn.train import History

    history = History()
    history.append(epoch=1, train_loss=0.5, train_acc=0.8, test_loss=0.6, test_acc=0.75, seconds=1)
    history.append(
        epoch=2, train_loss=float("nan"), train_acc=0.1, test_loss=float("inf"), test_acc=0.1,
        seconds=1,
    )  # fmt: skip
    text = history.to_json()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(text, parse_constant=refuse)  # what a strict parser (JavaScript) reads
    assert data["train_loss"] == [0.5, None] and data["test_loss"] == [0.6, None]
    back = History.from_json(text)
    assert back.epoch == [1, 2] and back.train_loss[0] == 0.5
    assert np.isnan(back.train_loss[1]) and np.isnan(back.test_loss[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": "ab"}, "epoch must be a list"),
        ({"epoch": [1, 3]}, "epoch must be 1, 2, 3"),
        ({"epoch": [1.0, 2.0]}, "epoch must be 1, 2, 3"),
        ({"train_loss": [0.5, "x"]}, "train_loss holds 'x'"),
        ({"seconds": [1, True]}, "seconds holds True"),
        ({"test_acc": [0.5]}, "different lengths"),
        ({"train_loss": [0.5, 10**400]}, "train_loss holds a number beyond the float range"),
    ],
)
def test_a_history_that_is_not_one_is_refused(change: dict, message: str) -> None:
    from scratchnn.train import HISTORY_KEYS, History

    data = {key: [1, 2] if key == "epoch" else [0.5, 0.25] for key in HISTORY_KEYS}
    with pytest.raises(ValueError, match=message):
        History.from_dict({**data, **change})


def rewrite_checkpoint(path: Path, **change: object) -> None:
    """Write ``path`` again with some of its contents changed, as an editor or a bug would."""
    checkpoint = load_checkpoint(path)
    contents = {
        "params": checkpoint.params, "optimizer_state": checkpoint.optimizer_state,
        "rng": checkpoint.rng(), "epoch": checkpoint.epoch, "config": checkpoint.config,
        "metadata": checkpoint.metadata,
    }  # fmt: skip
    save_checkpoint(path, **{**contents, **change})  # type: ignore[arg-type]


@needs_data
def test_a_checkpoint_whose_contents_do_not_agree_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    checkpoint = out / "checkpoint.safetensors"
    original = checkpoint.read_bytes()
    config = load_checkpoint(checkpoint).config
    state = load_checkpoint(checkpoint).optimizer_state
    params = load_checkpoint(checkpoint).params
    cases = [
        # Weights in another dtype than the run computes in: cast on loading, they would
        # have gone on without a word (int32 weights scored, float64 ones rounded).
        ({"params": {**params, "W1": params["W1"].astype(np.float64)}},
         "the run computes in float32, but the file stores W1 (float64)"),
        ({"params": {**params, "b2": (1000 * params["b2"]).astype(np.int32)}},
         "the run computes in float32, but the file stores b2 (int32)"),
        ({"metadata": {"history": "not json"}}, "history is not JSON"),
        ({"metadata": {"history": "[" * 100_000 + "]" * 100_000}}, "history is not JSON"),
        ({"metadata": {"history": '{"epoch": 3}'}}, "history must have the keys"),
        ({"epoch": 5}, "its history has 2 epochs, its epoch count 5"),
        ({"config": {**config, "hidden": [100_000_000]}}, "sizes [100000000] match no stored"),
        ({"config": {**config, "dtype": "float64"}}, "float64"),
        # A file that names its model was written with every later setting: one missing is
        # not an earlier version's (whose defaults would stand in), but a loss.
        ({"config": {k: v for k, v in config.items() if k != "dropout"}},
         "run settings missing: ['dropout']"),
        # A state lost (an export that dropped it): the run would go on from zero moments.
        ({"optimizer_state": {}}, "the optimiser's state lacks m/W1, v/W1, m/b1, v/b1"),
        ({"optimizer_state": {k: v for k, v in state.items() if k.endswith("/W1")}},
         "the optimiser's state lacks m/b1, v/b1, m/W2, v/W2"),
    ]
    for change, message in cases:
        checkpoint.write_bytes(original)
        rewrite_checkpoint(checkpoint, **change)
        capsys.readouterr()
        assert main(["train", "--resume", "--epochs", "3", "--out", str(out)]) == 2, change
        err = capsys.readouterr().err
        assert f"{checkpoint}: " in err and message in err, (change, err)
        assert len(err.strip().splitlines()) == 1
    # A checkpoint written before the data's fingerprint was kept resumes as before.
    checkpoint.write_bytes(original)
    metadata = dict(load_checkpoint(checkpoint).metadata)
    del metadata["data"]
    rewrite_checkpoint(checkpoint, metadata=metadata)
    assert main(["train", "--resume", "--epochs", "3", "--out", str(out)]) == 0
    # evaluate refuses weights of another dtype as resume does.
    checkpoint.write_bytes(original)
    rewrite_checkpoint(checkpoint, params={**params, "W1": params["W1"].astype(np.float64)})
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "the run computes in float32, but the file stores W1 (float64)" in capsys.readouterr().err
    # evaluate builds the network from the configuration too: no allocation of 10**8 units.
    checkpoint.write_bytes(original)
    rewrite_checkpoint(checkpoint, config={**config, "hidden": [100_000_000]})
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "match no stored weight" in capsys.readouterr().err


@needs_data
def test_an_interrupted_overwrite_leaves_the_replaced_run_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new run saved nothing: the folder still holds the old run, every file of it
    # (none of the new run's), and evaluate scores that run, as it is.
    import scratchnn.runs

    out = trained_run(tmp_path)
    before = {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the new run's first epoch

    monkeypatch.setattr(scratchnn.runs, "fit", interrupted)
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "3", "--overwrite", "--out", str(out)]) == 130
    assert {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(scratchnn.runs.RUN_FILES)
    err = capsys.readouterr().err
    assert "nothing to resume; run it again" in err and "--resume" not in err
    assert f"the run already in {out} is as it was" in err


@needs_data
@pytest.mark.parametrize("how", ["--overwrite", "--resume"])
def test_a_first_checkpoint_that_cannot_be_written_leaves_the_run_as_it_was(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk at the new run's first checkpoint: the replaced run's model and curve were
    # deleted before the write that failed. Now they go only once it is written whole.
    import errno

    import scratchnn.checkpoint
    import scratchnn.runs

    out = trained_run(tmp_path)
    before = {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES}

    def disk_full(path: Any, header: bytes, arrays: Any) -> None:
        with scratchnn.checkpoint.atomic_path(path) as temporary:
            temporary.write_bytes(header[:10])  # the disk fills up part-way
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scratchnn.checkpoint, "_atomic_write", disk_full)
    argv = ["--resume", "--epochs", "3"] if how == "--resume" else [*SMALL, "--epochs", "3", how]
    capsys.readouterr()
    assert main(["train", *argv, "--out", str(out)]) == 2
    assert {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(scratchnn.runs.RUN_FILES)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint.safetensors" in err


@needs_data
@pytest.mark.parametrize("how", ["--overwrite", "--resume"])
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_first_checkpoint_stopped_before_its_rename_leaves_the_run_as_it_was(
    how: str, failure: BaseException, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Written whole, but the fsync before the rename fails (a full disk reports it there)
    # or is interrupted: the replaced run keeps its model and curve, every file as it was.
    import scratchnn.files
    import scratchnn.runs

    out = trained_run(tmp_path)
    before = {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES}
    real_fsync = scratchnn.files._fsync

    def failing(path: Any) -> None:
        if Path(path).name.startswith(".checkpoint."):
            raise failure
        real_fsync(path)

    monkeypatch.setattr(scratchnn.files, "_fsync", failing)
    argv = ["--resume", "--epochs", "3"] if how == "--resume" else [*SMALL, "--epochs", "3", how]
    capsys.readouterr()
    expected = 130 if isinstance(failure, KeyboardInterrupt) else 2
    assert main(["train", *argv, "--out", str(out)]) == expected
    assert {name: (out / name).read_bytes() for name in scratchnn.runs.RUN_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(scratchnn.runs.RUN_FILES)


@needs_data
def test_an_interrupt_just_after_the_first_checkpoints_rename_counts_it_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C in the directory's fsync, once the new run's first checkpoint has its name: that
    # epoch is saved (the hint continues it), and the replaced run's model and curve are gone,
    # so evaluate scores the new checkpoint, not the old model.
    import scratchnn.files
    import scratchnn.runs

    out = trained_run(tmp_path)
    real_fsync_directory = scratchnn.files._fsync_directory
    interrupts = []

    def interrupted(directory: Any) -> None:
        real_fsync_directory(directory)
        checkpoint = load_checkpoint(out / "checkpoint.safetensors")
        if checkpoint.config["seed"] == 7 and not interrupts:
            interrupts.append(checkpoint.epoch)
            raise KeyboardInterrupt

    monkeypatch.setattr(scratchnn.files, "_fsync_directory", interrupted)
    capsys.readouterr()
    argv = ["train", *SMALL, "--epochs", "3", "--seed", "7", "--overwrite", "--out", str(out)]
    assert main(argv) == 130
    assert interrupts == [1]
    assert not (out / "model.safetensors").exists() and not (out / "learning_curve.png").exists()
    err = capsys.readouterr().err
    assert "continue with: scratchnn train --resume" in err and "as it was" not in err
    # The histories follow the checkpoint (the old run's had 1 epoch too: compare the loss).
    history = json.loads((out / "history.json").read_text())
    saved = json.loads(load_checkpoint(out / "checkpoint.safetensors").metadata["history"])
    assert history == saved
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "history.csv",
                                                     "history.json"]  # fmt: skip


@needs_data
def test_while_the_first_checkpoint_is_written_the_replaced_model_is_out_of_sight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No moment shows the replaced run's model beside the new run's checkpoint (evaluate
    # would score the old model as the latest): it steps aside while the checkpoint is
    # written, and goes once it has its name; nothing hidden is left behind.
    import scratchnn.runs

    out = trained_run(tmp_path)
    real_save = scratchnn.runs.save_checkpoint
    seen = []

    def watched(path: Any, **contents: Any) -> None:
        seen.append(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
        real_save(path, **contents)

    monkeypatch.setattr(scratchnn.runs, "save_checkpoint", watched)
    assert main(["train", *SMALL, "--epochs", "2", "--overwrite", "--out", str(out)]) == 0
    assert "model.safetensors" not in seen[0] and "learning_curve.png" not in seen[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(scratchnn.runs.RUN_FILES)


@needs_data
def test_an_interrupted_resume_leaves_no_older_model_for_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scratchnn.runs

    out = trained_run(tmp_path)
    # Ctrl-C right after epoch 2's checkpoint
    monkeypatch.setattr(scratchnn.runs, "fit", stopped_after_an_epoch(scratchnn.runs.fit))
    assert main(["train", "--resume", "--epochs", "3", "--out", str(out)]) == 130
    assert load_checkpoint(out / "checkpoint.safetensors").epoch == 2
    # The epoch-1 model and curve are gone: evaluate scores the epoch-2 checkpoint.
    assert not (out / "model.safetensors").exists() and not (out / "learning_curve.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    accuracy = f"test accuracy {100 * history['test_acc'][-1]:.2f}%"
    assert accuracy in capsys.readouterr().out


@needs_data
def test_a_resume_on_other_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same files but for one training label among the examples the run uses: its
    # batches would differ from the run's, so the resume stops, naming both data sets.
    import gzip
    import shutil

    from scratchnn.data.idx import read_idx

    source = find_dataset_files("fashion-mnist")
    other = tmp_path / "other-data"
    other.mkdir()
    for path in source.values():
        shutil.copy(path, other / path.name)
    labels = read_idx(source["train-labels-idx1-ubyte"]).copy()
    labels[100] = (labels[100] + 1) % 10
    with gzip.open(other / source["train-labels-idx1-ubyte"].name, "wb") as file:
        file.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes())
    out = trained_run(tmp_path)
    capsys.readouterr()
    argv = ["train", "--resume", "--epochs", "2", "--out", str(out)]
    assert main([*argv, "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the run trained on other data (300 training and 10000 test examples, crc32" in err
    assert "resume with the data it started with" in err
    assert main([*argv, "--data", str(source["train-labels-idx1-ubyte"].parent)]) == 0


@needs_data
def test_the_interrupt_hint_is_a_command_that_continues_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex

    import scratchnn.runs

    out = tmp_path / "my run"  # a space: the hint must quote it
    real_fit = scratchnn.runs.fit
    monkeypatch.setattr(scratchnn.runs, "fit", stopped_after_an_epoch(real_fit))
    data = str(find_dataset_files("fashion-mnist")["train-labels-idx1-ubyte"].parent)
    argv = ["train", *SMALL, "--epochs", "3", "--data", data, "--out", str(out)]
    assert main(argv) == 130
    assert main(["train", "--resume", "--epochs", "4", "--data", data, "--out", str(out)]) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    command = hint.split("continue with: scratchnn ", 1)[1]
    assert shlex.split(command) == [
        "train", "--resume", "--out", str(out), "--epochs", "4", "--data", data
    ]  # fmt: skip
    monkeypatch.setattr(scratchnn.runs, "fit", real_fit)
    assert main(shlex.split(command)) == 0  # as printed, it trains on to the 4 epochs asked
    assert load_checkpoint(out / "checkpoint.safetensors").epoch == 4


@needs_data
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "100000"], "limit 100000 is more than the 60000 training examples"),
        (
            ["--model", "cnn", "--channels", "2,2,2,2,2", "--limit", "100"],
            "5 conv blocks (channels [2, 2, 2, 2, 2]) halve 28x28 images to nothing; at most 4",
        ),
    ],
)
def test_settings_the_data_cannot_take_fail_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_network_larger_than_memory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scratchnn.runs

    def too_large(*args: Any, **kwargs: Any) -> None:
        raise MemoryError  # what NumPy raises for --hidden 100000000 (584 GiB)

    monkeypatch.setattr(scratchnn.runs, "_start", too_large)
    assert main(["train", "--hidden", "100000000", "--out", str(tmp_path / "run")]) == 2
    assert "does not fit in memory" in capsys.readouterr().err
    monkeypatch.setattr("scratchnn.graph.draw.DRAWINGS", {"network": too_large})
    assert main(["graph", "network", "--sizes", "100000,100000"]) == 2
    assert "does not fit in memory" in capsys.readouterr().err


@needs_data
def test_more_epochs_of_a_run_its_iteration_cap_ended_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run")
    assert main(["train", *SMALL, "--iterations", "5", "--epochs", "4", "--out", out]) == 0
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["epoch"]) == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "6", "--out", out]) == 2
    assert "has taken all 5 of its iterations" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", out]) == 0  # as it was: complete, as before
    # Its own epochs, given again (as the interrupt hint repeats them): complete too.
    assert main(["train", "--resume", "--epochs", "4", "--out", out]) == 0


@needs_data
@pytest.mark.filterwarnings("default")  # as Python runs the command: warnings are shown
def test_a_diverging_runs_warnings_are_one_line_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--limit", "2000", "--lr", "1e6", "--optimizer", "sgd", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line]
    assert "scratchnn train: note: overflow encountered" in err
    assert all(line.startswith("scratchnn train: note: ") for line in notes), err


# -- a replaced run stays whole until the new one has saved; one run at a time ----------------


@needs_data
def test_a_run_that_fails_in_its_first_epoch_leaves_the_replaced_run_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 10**19 epochs pass the settings' own checks and fail in fit, after the data loaded.
    out = trained_run(tmp_path)
    before = files_of(out)
    capsys.readouterr()
    huge = str(10**19)
    assert main(["train", *SMALL, "--epochs", huge, "--overwrite", "--out", str(out)]) == 2
    assert main(["train", "--resume", "--epochs", huge, "--out", str(out)]) == 2
    assert files_of(out) == before
    # A new folder for such a run is not left behind.
    assert main(["train", *SMALL, "--epochs", huge, "--out", str(tmp_path / "new" / "run")]) == 2
    assert not (tmp_path / "new").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


@needs_data
def test_any_file_of_a_run_marks_its_folder_as_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained_run(tmp_path)
    (out / "checkpoint.safetensors").unlink()  # a finished run's model and histories remain
    before = files_of(out)
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a training run (model.safetensors, history.json" in capsys.readouterr().err
    assert files_of(out) == before


@needs_data
@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl file locks on Windows")
def test_a_second_run_into_a_busy_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.runs import _RunLock

    out = tmp_path / "run"
    out.mkdir()
    (out / _RunLock.FILE).write_text("")  # left by a killed run: not a lock any more
    held = _RunLock(out)  # as another process training there now would hold it
    try:
        assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 2
        assert "another scratchnn run is writing to" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [_RunLock.FILE]
    finally:
        held.release()
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    assert not (out / _RunLock.FILE).exists()  # released, and removed


@needs_data
@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl file locks on Windows")
def test_a_folder_that_cannot_be_locked_is_trained_into_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some network mounts have no flock: the run goes on (it cannot tell), but says that
    # nothing keeps a second run out of the folder.
    import errno

    import scratchnn.runs

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    assert scratchnn.runs.fcntl is not None
    monkeypatch.setattr(scratchnn.runs.fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    assert f"note: {out} cannot be locked here (No locks available)" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()


@needs_data
@pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                    reason="a file system that takes names of bytes that are not UTF-8")
def test_a_path_the_terminal_cannot_show_does_not_fail_a_finished_run(tmp_path: Path) -> None:
    # Under a strict UTF-8 stdout, a folder named with a byte that is not UTF-8 failed the
    # run at its last line (exit 2, "can't encode"), after all its files were written, and
    # its resume before the first epoch. Now such bytes print as escapes.
    out = os.fsencode(tmp_path) + b"/odd\xff run"
    environment = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for argv in (["--epochs", "1", *SMALL], ["--epochs", "2", "--resume"]):
        result = subprocess.run(
            [sys.executable, "-m", "scratchnn", "train", *argv, "--out", out],
            capture_output=True, env=environment, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert b"odd\\udcff run" in result.stdout
    assert os.path.exists(out + b"/model.safetensors")


@needs_data
def test_a_lock_that_cannot_be_made_leaves_no_folder_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock file cannot be opened (permissions changed meanwhile, say): the run stops
    # with one line, and the folders it made for itself go again.
    import errno

    import scratchnn.runs

    def refused(self: Any, out: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "x.lock"))

    monkeypatch.setattr(scratchnn.runs._RunLock, "__init__", refused)
    out = tmp_path / "new" / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@needs_data
def test_an_interrupt_before_any_epoch_of_an_overwrite_points_at_nothing_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scratchnn.runs

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "3", "--out", str(out)]) == 0

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the data loads

    monkeypatch.setattr(scratchnn.runs, "load_data", interrupted)
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "1", "--overwrite", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume" not in err and "is as it was" in err


@needs_data
def test_an_error_writing_the_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained_run(tmp_path)
    (out / "history.json").unlink()
    (out / "history.json").mkdir()  # where the run writes a file
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "1", "--overwrite", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "history.json" in err, err


@needs_data
@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_evaluate_refuses_weights_of_a_dtype_no_layer_takes_in_one_line(
    dtype: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.checkpoint import load_safetensors, save_safetensors

    out = trained_run(tmp_path)
    tensors, metadata = load_safetensors(out / "model.safetensors")
    key = next(k for k in tensors if k.endswith("b2"))
    tensors[key] = tensors[key].astype(dtype)
    save_safetensors(tmp_path / "bad.safetensors", tensors, metadata)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b2" in err and np.dtype(dtype).name in err, err


@needs_data
@pytest.mark.parametrize("file", ["model.safetensors", "checkpoint.safetensors"])
def test_a_saved_configuration_missing_a_setting_is_refused(
    file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Filled in from the defaults, a tanh network without its "activation" was scored as
    # a ReLU one, and a checkpoint without its "limit" resumed on all 60,000 images.
    from scratchnn.checkpoint import load_safetensors, save_safetensors

    out = trained_run(tmp_path, "--activation", "tanh")
    tensors, metadata = load_safetensors(out / file)
    key = next(k for k in metadata if "config" in k)
    config = json.loads(metadata[key])
    del config["activation"]
    save_safetensors(out / file, tensors, {**metadata, key: json.dumps(config)})
    capsys.readouterr()
    command = ["evaluate", str(out / file)] if file.startswith("model") else [
        "train", "--resume", "--epochs", "2", "--out", str(out)]  # fmt: skip
    assert main(command) == 2
    assert "run settings missing: ['activation']" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_evaluate_refuses_a_pipe_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Opening a pipe for reading waits for a writer: it must be refused before it is opened.
    import threading

    pipe = tmp_path / "model.safetensors"
    os.mkfifo(pipe)
    codes: list[int] = []
    command = threading.Thread(target=lambda: codes.append(main(["evaluate", str(pipe)])))
    command.start()
    command.join(timeout=10)
    if command.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # release the waiting open
        command.join()
        pytest.fail("evaluate waited on the pipe for a writer")
    assert codes == [2]
    assert f"{pipe}: not a regular file" in capsys.readouterr().err


@needs_data
def test_runs_saved_before_later_settings_existed_still_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Files of the first versions have no model, channels, dropout or lr_decay: an MLP
    # without decay, which those settings' defaults give. They evaluate and resume.
    from scratchnn.checkpoint import load_safetensors, save_safetensors
    from scratchnn.runs import LATER_SETTINGS

    out = trained_run(tmp_path)
    for file in ("model.safetensors", "checkpoint.safetensors"):
        tensors, metadata = load_safetensors(out / file)
        key = next(k for k in metadata if "config" in k)
        config = {k: v for k, v in json.loads(metadata[key]).items() if k not in LATER_SETTINGS}
        save_safetensors(out / file, tensors, {**metadata, key: json.dumps(config)})
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors")]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", str(out)]) == 0


def test_a_model_file_cannot_name_more_parameters_than_it_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A weight of no elements, shape (0, n), has n for a dimension: each configured size
    # seemed stored, and a 536-byte file built a 30000 x 30000 network (11.5 GB) before the
    # weights were compared. The count of parameters the configuration implies is checked
    # against the numbers the file holds first.
    from scratchnn.checkpoint import save_model
    from scratchnn.runs import RunConfig

    path = tmp_path / "model.safetensors"
    config = RunConfig(hidden=[30_000, 30_000], epochs=1)
    save_model(path, {"W2": np.zeros((0, 30_000), np.float32)}, config.to_dict())
    assert path.stat().st_size < 1000
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    needed = 784 * 30_000 + 30_000 + 30_000 * 30_000 + 30_000 + 30_000 * 10 + 10
    assert f"the configuration's network has {needed} parameters" in err
    assert "but the file holds 0 numbers" in err


@pytest.mark.parametrize(
    "settings",
    [{"hidden": [50]}, {"hidden": [256, 128, 64]},
     {"model": "cnn", "hidden": [128], "channels": [16, 32]},
     {"model": "cnn", "hidden": [7], "channels": [3, 5, 2]}],
)  # fmt: skip
def test_the_parameter_count_of_a_configuration_is_that_of_its_network(settings: Any) -> None:
    from scratchnn.runs import RunConfig, build_network, parameter_count

    config = RunConfig(**settings)
    network = build_network(config, np.random.default_rng(0))
    assert parameter_count(config) == sum(array.size for array in network.params.values())
