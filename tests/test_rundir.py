"""A run directory: one job at a time, one configuration, finished runs not re-run, only imsm's files deleted.

Each case here went wrong before ``imsm.rundir`` (issue 18): a finished run re-run trained one step past the end and
recorded ``train_loss: 0.0``; another configuration silently resumed this one's checkpoint; ``resume=false`` killed
before its save left a new adapter beside an old ``status: ok``; two jobs shared one directory; another tool's
``checkpoint-N`` folders were deleted; a damaged checkpoint failed with an unnamed ``EOFError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_overrides, write_gsm
from safetensors.torch import load_file, save_file

from imsm import resilience
from imsm.model.build import load_model
from imsm.rundir import RunDirError, claim_run_dir, differences
from imsm.train import train
from imsm.training import IMSMTrainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_gsm(tmp_path_factory.mktemp("data"))


def overrides(run_dir: Path, data_dir: Path, **extra: object) -> list[str]:
    base = [*tiny_overrides(run_dir, data_dir), "eval.compare_base=false", "trainer.args.save_steps=1"]
    return base + [f"{k}={v}" for k, v in extra.items()]


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every result file of a run directory (not the lock), by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".imsm.lock"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(compose_train(overrides(run_dir, data_dir)))
    assert result["status"] == "ok" and result["global_steps"] == 2
    return run_dir


def no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the run was finished")

    monkeypatch.setattr(IMSMTrainer, "train", refuse)


def test_a_finished_run_is_not_run_again_and_its_files_stay_identical(finished, data_dir, monkeypatch):
    before = files_of(finished)
    no_training(monkeypatch)
    again = train(compose_train(overrides(finished, data_dir)))
    assert again["status"] == "ok" and again["global_steps"] == 2
    assert again["train_loss"] == json.loads((finished / "metrics.json").read_text())["train_loss"]
    assert files_of(finished) == before  # adapter, gate, metrics, checkpoints: byte for byte


def test_a_crash_after_the_last_checkpoint_does_not_train_past_the_end(tmp_path, finished, data_dir):
    """No metrics.json (killed while evaluating): the re-run takes the final checkpoint, runs no step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "checkpoints"):  # the state a kill during the final evaluation leaves
        src = finished / name
        if src.is_dir():
            import shutil

            shutil.copytree(src, run_dir / name)
        else:
            (run_dir / name).write_bytes(src.read_bytes())
    cfg = compose_train(overrides(run_dir, data_dir))
    result = train(cfg)
    first = json.loads((finished / "metrics.json").read_text())
    assert result["global_steps"] == 2  # was 3 (one step past max_steps), with train_loss 0.0
    assert result["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    assert result["train_seconds"] == pytest.approx(
        json.loads((run_dir / "checkpoints/checkpoint-2/progress.json").read_text())["train_seconds"]
    )
    want, got = load_file(str(finished / "gate.safetensors")), load_file(str(run_dir / "gate.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_another_configuration_in_the_same_run_dir_is_refused(finished, data_dir, monkeypatch):
    before = files_of(finished)
    no_training(monkeypatch)
    with pytest.raises(RunDirError, match=r"other training settings .*seed: 42 -> 7") as e:
        train(compose_train(overrides(finished, data_dir, seed=7)))
    assert "resume=false" in str(e.value) and "another run_dir" in str(e.value)
    with pytest.raises(RunDirError, match="peft.optimizer.learning_rate"):
        train(compose_train(overrides(finished, data_dir, **{"peft.optimizer.learning_rate": 0.1})))
    with pytest.raises(
        RunDirError, match=r"other evaluation settings: max_eval_samples: 3 -> 2.*imsm.evaluate"
    ):
        train(compose_train(overrides(finished, data_dir, max_eval_samples=2)))
    assert files_of(finished) == before  # a refusal writes nothing, not even a failed metrics.json


def test_the_entry_point_does_not_overwrite_a_finished_record_with_a_refusal(finished, data_dir):
    from imsm.train import record_failure

    before = (finished / "metrics.json").read_bytes()
    cfg = compose_train(overrides(finished, data_dir, seed=7))
    with pytest.raises(RunDirError) as e:
        train(cfg)
    record_failure(cfg, e.value, 1.0)  # what hydra_main does with any error
    assert (finished / "metrics.json").read_bytes() == before


def test_resume_false_removes_the_earlier_outputs_before_anything_else(
    tmp_path, finished, data_dir, monkeypatch
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the save")

    monkeypatch.setattr("imsm.train.save_trained", killed)
    with pytest.raises(KeyboardInterrupt):
        train(compose_train(overrides(run_dir, data_dir, resume="false")))
    for name in ("metrics.json", "adapter", "gate.safetensors", "gate.json", "eval"):
        assert not (run_dir / name).exists(), name  # no old status: ok beside the new checkpoints
    with pytest.raises(FileNotFoundError, match="gate.json is missing"):
        load_model(run_dir)


def test_two_jobs_in_one_run_dir_are_refused(tmp_path, data_dir):
    cfg = compose_train(overrides(tmp_path / "run", data_dir))
    busy = pytest.raises(RunDirError, match=r"in use by another imsm job \(\{\"pid\"")
    with claim_run_dir(tmp_path / "run", cfg), busy, claim_run_dir(tmp_path / "run", cfg):
        pass
    with claim_run_dir(tmp_path / "run", cfg):  # released at the end of the first
        pass


def test_differences_name_each_key_with_both_values():
    from omegaconf import OmegaConf

    a = OmegaConf.create({"seed": 1, "eval": {"batch_size": 2}, "trainer": {"args": {"save_steps": 5}}})
    b = OmegaConf.create(
        {"seed": 2, "eval": {"batch_size": 4}, "trainer": {"args": {"save_steps": 9}}, "new": 1}
    )
    assert differences(a, b, skip=("eval", "trainer.args.save_steps")) == [
        "new: '(unset)' -> 1",
        "seed: 1 -> 2",
    ]
    assert differences(a, b, only=("eval",)) == ["eval.batch_size: 2 -> 4"]


# --- checkpoints: only imsm's are touched, damaged ones are named ----------------------------------------------
def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    resilience.claim_checkpoint(path)
    save_file({"w": torch.arange(4.0)}, str(path / resilience.TRAINABLE_WEIGHTS))
    torch.save({"step": torch.tensor(step)}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        resilience.mark_complete(path, step)
    return path


def test_another_tools_checkpoint_folders_are_never_deleted(tmp_path):
    folder = tmp_path / "checkpoints"
    foreign = folder / "checkpoint-9"
    foreign.mkdir(parents=True)
    (foreign / "model.bin").write_bytes(b"someone else's")
    checkpoint(folder, 1)
    checkpoint(folder, 2)
    checkpoint(folder, 3, complete=False)
    assert resilience.resolve_resume("auto", folder) == str(folder / "checkpoint-2")
    assert not (folder / "checkpoint-3").exists() and foreign.is_dir()  # imsm's half-written one removed
    resilience.rotate_checkpoints(folder, keep=1)
    assert [p.name for p in resilience.checkpoint_dirs(folder)] == ["checkpoint-2", "checkpoint-9"]
    assert resilience.resolve_resume("false", folder) is None
    assert [p.name for p in resilience.checkpoint_dirs(folder)] == ["checkpoint-9"]


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        (resilience.TRAINABLE_WEIGHTS, lambda p: p.write_bytes(p.read_bytes()[:-5])),  # truncated
        ("trainer_state.json", lambda p: p.write_text("{garbage")),
        ("rng_state.pth", lambda p: p.write_bytes(p.read_bytes()[:40])),  # truncated zip
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_older_intact_one(tmp_path, name, damage):
    folder = tmp_path / "checkpoints"
    checkpoint(folder, 2)
    newest = checkpoint(folder, 4)
    damage(newest / name)
    with pytest.raises(resilience.CorruptCheckpointError) as e:
        resilience.resolve_resume("auto", folder)
    message = str(e.value)
    assert str(newest / name) in message and f"resume={folder / 'checkpoint-2'}" in message
    assert resilience.resolve_resume(str(folder / "checkpoint-2"), folder) == str(folder / "checkpoint-2")
