"""Trustworthy runs: checkpoints, exact resume after SIGKILL, signals, refusals that write nothing."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as main_module
import algorithms
import results
import run_control
import train as train_module
from checkpoint import load_checkpoint, save_checkpoint
from config import result_settings
from conftest import LENET, MCD_COLUMNS as CSV_COLUMNS, make_digits_root, read_rows as _rows, train_args as _args
from iteration import EpochLosses, NonFiniteLoss, TrainStep
from run_control import Interrupted, SignalGuard

ROOT = Path(__file__).resolve().parents[1]


def _results(path: Path) -> list[dict[str, str]]:
    """Every column but the wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(path)]


def _snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def _outputs(csv_path: Path) -> tuple[Path, Path, Path]:
    return csv_path, csv_path.with_suffix(".json"), csv_path.with_suffix(".pt")


@pytest.fixture(scope="module")
def finished_run(digits_root, tmp_path_factory) -> Path:
    """One complete 2-epoch run; tests copy its files rather than train again."""
    csv_path = tmp_path_factory.mktemp("finished") / "run.csv"
    assert main_module.main(_args(digits_root, csv_path)) == 0
    return csv_path


def _copy_run(source: Path, folder: Path) -> Path:
    for path in _outputs(source):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder / source.name


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_each_epoch_leaves_a_weights_only_checkpoint_that_agrees_with_the_csv(finished_run):
    checkpoint = torch.load(finished_run.with_suffix(".pt"), weights_only=True)  # no pickled code inside
    assert checkpoint["epoch"] == 2 and len(checkpoint["rows"]) == 2
    assert {key.split(".")[0] for key in checkpoint["models"]} == {"G", "F1", "F2"}  # the method's state_dict
    assert set(checkpoint["optimizers"]) == {"G", "F"}
    assert checkpoint["optimizers"]["G"]["state"][0]["exp_avg"].shape == checkpoint["models"]["G.net.0.weight"].shape
    assert set(checkpoint["rng"]) == {"torch", "device", "numpy", "python"}
    assert [s["position"] for s in checkpoint["streams"]] == [32, 32]  # 2 epochs x 2 batches of 8, each stream
    assert set(result_settings()) <= set(checkpoint["config"])
    csv_rows = _rows(finished_run)
    assert [int(r["epoch"]) for r in csv_rows] == [row["epoch"] for row in checkpoint["rows"]] == [1, 2]
    assert float(csv_rows[-1]["target_acc_ensemble"]) == pytest.approx(checkpoint["rows"][-1]["target_acc_ensemble"], abs=1e-4)
    assert not list(finished_run.parent.glob("*.tmp"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"format_version": 1, "epoch": 1})

    def dies_half_way(payload, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_checkpoint(path, {"format_version": 1, "epoch": 2})
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------
# Never overwrite; resume only what can be resumed


def test_an_existing_run_is_never_overwritten_without_overwrite(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_an_existing_run_made_with_other_settings_is_named_and_resume_not_offered(finished_run, digits_root, tmp_path,
                                                                                   capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path, "--lr", "0.001")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other settings (lr 0.0002 -> 0.001)" in err and "--resume" not in err
    assert "choose another --csv" in err and "--overwrite" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_overwrite_starts_afresh(finished_run, digits_root, tmp_path):
    csv_path = _copy_run(finished_run, tmp_path)
    csv_path.write_text(",".join(CSV_COLUMNS) + "\n" + "7,1,1,1,1,1,1,1,1,1\n")  # a stranger's row
    assert main_module.main(_args(digits_root, csv_path, "--overwrite", epochs=1)) == 0
    assert [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1


def test_resume_refuses_other_settings_and_names_them(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    args = _args(digits_root, csv_path, "--resume", "--lr", "0.001", epochs=3)
    args[args.index("--num-k") + 1] = "2"
    assert main_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr 0.0002 -> 0.001" in err and "num_k 1 -> 2" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_refuses_changed_dataset_files(finished_run, tmp_path, capsys):
    other_data = tmp_path / "other"
    make_digits_root(other_data, seed=1)  # same layout, other images
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(other_data, csv_path, "--resume", epochs=3)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "dataset files changed" in errors[0] and "usps.bz2" in errors[0]
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_without_a_checkpoint_or_from_a_corrupt_one(digits_root, tmp_path, finished_run, capsys):
    assert main_module.main(_args(digits_root, tmp_path / "none.csv", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    csv_path = _copy_run(finished_run, tmp_path)
    csv_path.with_suffix(".pt").write_bytes(b"\x00" * 100)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable checkpoint" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_drops_rows_written_after_the_checkpoint_and_continues(finished_run, digits_root, tmp_path):
    csv_path = _copy_run(finished_run, tmp_path)
    with open(csv_path, "a") as file:
        file.write("3,6,9.9,9,9,9,9,9,9,9\n")  # a row no checkpoint vouches for
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 0
    rows = _rows(csv_path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["loss_source"] != "9" and _results(csv_path)[:2] == _results(finished_run)
    assert load_checkpoint(csv_path.with_suffix(".pt"))["resumed_at"] == [2]


def test_resume_of_a_finished_run_trains_nothing(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    assert main_module.main(_args(digits_root, csv_path, "--resume")) == 0
    assert "already holds all 2 epochs" in capsys.readouterr().out
    assert _results(csv_path) == _results(finished_run)


# ---------------------------------------------------------------------------------------------------
# Exact: --deterministic reruns and SIGKILL + --resume give the same CSV (real processes)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_rows(csv_path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv_path.exists() and len(_rows(csv_path)) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{csv_path} never reached {count} rows")


@pytest.fixture(scope="module")
def deterministic_reference(digits_root, tmp_path_factory) -> Path:
    csv_path = tmp_path_factory.mktemp("reference") / "reference.csv"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *_args(digits_root, csv_path, "--deterministic",
                                                                            epochs=3, iters=KILLED_ITERS)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return csv_path


KILLED_ITERS = 30  # about a second per epoch of the small network: the kill lands inside epoch 2


@pytest.mark.slow
@pytest.mark.parametrize("every", ["0", "10"])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_csv(deterministic_reference, digits_root, tmp_path, every):
    # Also proves --deterministic reruns identical: the killed run is a second run, its epoch-1 row must match.
    # --checkpoint-every 0: a state after every epoch, so the resume continues from one; 10 (minutes, the default):
    # no state before the end, so the resume starts again from epoch 1, says so, and still ends with the same CSV.
    csv_path = tmp_path / "killed.csv"
    args = _args(digits_root, csv_path, "--deterministic", "--checkpoint-every", every, epochs=3, iters=KILLED_ITERS)
    process = _start(args)
    _wait_for_rows(csv_path, 1, process)  # epoch 1 is in the CSV; epoch 2 is under way
    time.sleep(0.3)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    if every == "0":
        assert "resuming after epoch 1" in resumed.stdout or "resuming after epoch 2" in resumed.stdout
    else:
        assert "stopped before its first training state was written; starting again from epoch 1" in resumed.stdout
    assert _results(csv_path) == _results(deterministic_reference)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR2, 140)])
def test_sigterm_sigint_and_slurms_sigusr2_keep_the_last_checkpoint_and_say_how_to_resume(digits_root, tmp_path, signum, code):
    csv_path = tmp_path / "stopped.csv"
    process = _start(_args(digits_root, csv_path, epochs=50))
    _wait_for_rows(csv_path, 1, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and "--resume" in err and "python main.py" in err
    saved = load_checkpoint(csv_path.with_suffix(".pt"))
    assert [int(r["epoch"]) for r in _rows(csv_path)] == [row["epoch"] for row in saved["rows"]]
    assert f"hold epochs 1-{saved['epoch']}" in err


def test_a_signal_before_the_next_seed_saved_an_epoch_names_the_finished_seed(digits_root, tmp_path, monkeypatch, capsys):
    real_load = train_module.load_digits
    calls = []

    def load_then_interrupt(*args, **kwargs):  # seed 2 is being set up when the SIGINT comes
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal.SIGINT)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_digits", load_then_interrupt)
    csv_path = tmp_path / "r.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", epochs=1)) == 130
    err = capsys.readouterr().err
    assert "r_seed1.csv and its checkpoint" in err and "hold epochs 1-1" in err and "--resume" in err, err
    assert "nothing was saved" not in err


def test_signal_guard_turns_signals_into_interrupted_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as error:
        with SignalGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
    assert error.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------------------------------------------
# Non-finite losses


def test_epoch_losses_report_the_first_non_finite_iteration():
    losses = EpochLosses(torch.device("cpu"))
    losses.add({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    with pytest.raises(NonFiniteLoss) as error:  # on a CPU, at once
        losses.add({"a": torch.tensor(float("nan")), "b": torch.tensor(2.0)})
    assert error.value.iteration == 2  # 1-based, as printed
    with pytest.raises(NonFiniteLoss) as error:
        losses.add({"a": torch.tensor(float("inf")), "b": torch.tensor(2.0)})
    assert error.value.iteration == 2 and int(losses.first_bad) == 1  # the first one stays
    with pytest.raises(NonFiniteLoss):
        losses.means()
    epoch = EpochLosses(torch.device("cpu"))  # a new epoch, all finite
    epoch.add({"a": torch.tensor(3.0), "b": torch.tensor(-1.0)})
    epoch.add({"a": torch.tensor(4.0), "b": torch.tensor(-2.0)})
    assert epoch.means() == {"a": 3.5, "b": -1.5}


def test_a_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_epoch(digits_root, tmp_path, monkeypatch, capsys):
    calls = []
    real_update = algorithms.MCD.update

    def update(self, xs, ys, xt):
        losses = real_update(self, xs, ys, xt)
        calls.append(1)
        if len(calls) >= 4:  # epoch 2, iteration 2 (two iterations per epoch)
            losses["discrepancy_b"] = losses["discrepancy_b"] * float("inf")
        return losses

    monkeypatch.setattr(algorithms.MCD, "update", update)
    csv_path = tmp_path / "nan.csv"
    assert main_module.main(_args(digits_root, csv_path, epochs=3)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "non-finite loss in epoch 2, iteration 2" in errors[0] and "hold epochs 1-1" in errors[0]
    assert [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1


def test_interrupted_before_the_first_epoch_says_to_start_again(digits_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(TrainStep, "__call__", interrupted)
    csv_path = tmp_path / "early.csv"
    assert main_module.main(_args(digits_root, csv_path)) == 143
    err = capsys.readouterr().err
    assert "no epoch had finished" in err and "Start again with: python main.py" in err and err.rstrip().endswith("--overwrite")
    assert not csv_path.with_suffix(".pt").exists() and _rows(csv_path) == []


# ---------------------------------------------------------------------------------------------------
# One writer per output: the run lock


# The small LeNet-style network (MNIST -> USPS): these tests are about files and processes, not the model.
def _lock(csv_path: Path) -> Path:
    return csv_path.with_suffix(".lock")


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_is_refused_until_the_holder_dies(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "busy.csv"
    holder = _start(_args(digits_root, csv_path, *LENET, "--checkpoint-every", "0", epochs=100_000))  # killed long before
    try:
        _wait_for_rows(csv_path, 1, holder)
        for flags in (["--overwrite"], ["--resume"], []):
            started = time.monotonic()
            assert main_module.main(_args(digits_root, csv_path, *LENET, *flags)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"another run (pid {holder.pid}, started " in err, err
            assert str(_lock(csv_path)) in err and "wait for it to finish" in err
            assert time.monotonic() - started < 5  # at once, never waiting for the lock
        assert main_module.main(["--evaluate", str(csv_path.with_suffix(".pt")), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "still training" in err and f"pid {holder.pid}" in err
        assert not csv_path.with_name("busy_evaluation.json").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays, but the kernel releases the lock
        holder.communicate()
    assert _lock(csv_path).exists()
    saved = load_checkpoint(csv_path.with_suffix(".pt"))["epoch"]
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--resume", epochs=saved + 1)) == 0
    assert [int(r["epoch"]) for r in _rows(csv_path)] == list(range(1, saved + 2))
    assert not _lock(csv_path).exists()  # a clean exit takes its lock file away


_NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
sys.path.insert(0, sys.argv[1])
import warnings
warnings.simplefilter("ignore")  # filelock warns that only a soft lock is available
import importlib
from pathlib import Path
for module in sorted(Path(sys.argv[1]).glob("*.py")):  # every module of the project
    importlib.import_module(module.stem)
import locks
assert not locks.NATIVE_LOCKS
try:
    with locks.run_lock(Path(sys.argv[2])):
        print("held", flush=True)
        sys.stdin.readline()
except locks.OutputError as error:
    print(error, flush=True)
"""


@pytest.mark.slow
def test_every_module_imports_without_fcntl_and_the_lock_still_takes_and_refuses(tmp_path):
    csv_path = tmp_path / "run.csv"
    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _NO_FCNTL, str(ROOT), str(csv_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = start()
    try:
        assert holder.stdout.readline() == "held\n", holder.communicate()
        refused, err = start().communicate(timeout=60)
        assert f"another run (pid {holder.pid}, started " in refused and "choose another --csv" in refused, err
    finally:
        holder.communicate("\n", timeout=60)
    assert not _lock(csv_path).exists()  # released on the way out
    killed = start()
    assert killed.stdout.readline() == "held\n"
    killed.kill()  # SIGKILL: its lock file stays behind ...
    killed.communicate()
    assert _lock(csv_path).exists()
    taken = start()  # ... and the next run clears it, since its holder is gone
    try:
        assert taken.stdout.readline() == "held\n", taken.communicate()
    finally:
        taken.communicate("\n", timeout=60)


@pytest.mark.slow
def test_seeds_lock_every_seed_before_the_first_trains(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "seeds.csv"
    holder = _start(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", epochs=100_000))
    try:
        _wait_for_rows(tmp_path / "seeds_seed1.csv", 1, holder)
        assert _lock(tmp_path / "seeds_seed2.csv").exists()  # seed 2 has not started, yet is held
        assert main_module.main(_args(digits_root, tmp_path / "seeds_seed2.csv", *LENET)) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "3")) == 2  # the summary's name is held too
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.communicate()


# ---------------------------------------------------------------------------------------------------
# Failed writes: one line, exit 2, the previous checkpoint and rows intact, resumable

LIMIT_EPOCH_2 = """
import resource, sys
sys.path.insert(0, {root!r})
import checkpoint, main
real_submit = checkpoint.CheckpointWriter.submit

def submit(self, payload, row, write_state):
    if row["epoch"] == 2:  # epoch 1 is on disk; from here on no file may grow past 64 KiB
        self.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    real_submit(self, payload, row, write_state)

checkpoint.CheckpointWriter.submit = submit
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def lenet_reference(digits_root, tmp_path_factory) -> Path:
    csv_path = tmp_path_factory.mktemp("lenet") / "reference.csv"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *_args(digits_root, csv_path, *LENET, "--deterministic", epochs=3)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return csv_path


@pytest.mark.slow
def test_file_size_limit_at_epoch_2_then_resume_gives_the_uninterrupted_csv(lenet_reference, digits_root, tmp_path):
    csv_path = tmp_path / "full.csv"
    args = _args(digits_root, csv_path, *LENET, "--deterministic", "--checkpoint-every", "0", epochs=3)
    limited = subprocess.run([sys.executable, "-c", LIMIT_EPOCH_2.format(root=str(ROOT)), *args],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    errors = [line for line in limited.stderr.splitlines() if line and not line.startswith("warning:")]
    assert limited.returncode == 2, limited.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {csv_path.with_suffix('.pt')} (file size limit)")
    assert "--resume" in errors[0] and "Traceback" not in limited.stderr
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1 and [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert not list(tmp_path.glob("*.tmp")) and not _lock(csv_path).exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _results(csv_path) == _results(lenet_reference)


def _disk_full_at_epoch_2(monkeypatch) -> None:
    """torch.save fails half-way through epoch 2's checkpoint as on a full disk: the zip writer raises
    a RuntimeError while handling the OSError (what torch really does)."""
    real_save = torch.save

    def save(payload, file):
        if payload["epoch"] == 2:
            file.write(b"half a checkpoint")
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        real_save(payload, file)

    monkeypatch.setattr(torch, "save", save)


def test_host_staging_copies_into_the_same_buffers_every_epoch():
    from checkpoint import HostStaging

    weight = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    payload = {"epoch": 1, "models": {"G": {"w": weight}}, "optimizers": [{"step": torch.tensor(3.0)}], "rows": [{"a": 1}]}
    staging = HostStaging()
    first, event = staging.stage(payload)
    assert event is None  # nothing on a GPU: plain copies, done at once
    assert torch.equal(first["models"]["G"]["w"], weight) and first["models"]["G"]["w"] is not weight
    assert first["models"]["G"]["w"].stride() == weight.stride() and first["rows"] == [{"a": 1}]
    pointer = first["models"]["G"]["w"].data_ptr()
    weight.add_(1.0)  # training goes on: the staged copy keeps the epoch's values...
    assert not torch.equal(first["models"]["G"]["w"], weight)
    second, _ = staging.stage({**payload, "epoch": 2})
    assert second["models"]["G"]["w"].data_ptr() == pointer and torch.equal(second["models"]["G"]["w"], weight)  # ...reused
    assert second["epoch"] == 2 and second["optimizers"][0]["step"].item() == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_staging_on_cuda_copies_asynchronously_into_pinned_buffers():
    from checkpoint import HostStaging

    weight = torch.randn(256, 1024, device="cuda")
    staged, event = HostStaging().stage({"w": weight, "rng": torch.get_rng_state()})
    weight.mul_(2.0)  # queued after the copy on the same stream: the copy still sees the old values
    event.synchronize()
    assert staged["w"].is_pinned() and torch.equal(staged["w"] * 2.0, weight.cpu())


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "cause"), [("disk full", "disk full"), ("host memory", "out of memory")])
def test_a_failed_checkpoint_is_one_line_and_keeps_epoch_1(digits_root, tmp_path, monkeypatch, capsys, fault, cause):
    if fault == "disk full":
        _disk_full_at_epoch_2(monkeypatch)
    else:
        import checkpoint
        real_stage = checkpoint.HostStaging.stage

        def stage(self, payload):
            if payload["epoch"] == 2:
                raise MemoryError()
            return real_stage(self, payload)

        monkeypatch.setattr(checkpoint.HostStaging, "stage", stage)
    csv_path = tmp_path / "fault.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--checkpoint-every", "0", epochs=3)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("warning:")]
    assert len(errors) == 1 and f"cannot write {csv_path.with_suffix('.pt')} ({cause})" in errors[0], errors
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1 and [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert not list(tmp_path.glob("*.tmp")) and not _lock(csv_path).exists()


def test_a_row_that_fails_half_way_is_cut_off_again(tmp_path, monkeypatch):
    import results
    from config import Config

    csv_path = tmp_path / "rows.csv"
    writer = results.ResultsWriter(Config(csv=str(csv_path)), {}, [], algorithms.MCD.LOSSES)
    row = {column: 1 for column in CSV_COLUMNS}
    writer.append(row)
    before = csv_path.read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full)
    with pytest.raises(results.OutputError, match=r"cannot write .*rows\.csv \(disk full\); the rest is safe"):
        writer.append({**row, "epoch": 2}, intact="; the rest is safe")
    writer.close()
    assert csv_path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_a_failed_record_says_what_is_intact(tmp_path, monkeypatch):
    import results
    from config import Config

    csv_path = tmp_path / "rows.csv"
    writer = results.ResultsWriter(Config(csv=str(csv_path)), {}, [], algorithms.MCD.LOSSES)

    def full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", full)
    with pytest.raises(results.OutputError, match=r"cannot write .*rows\.json \(disk full\); the rest is safe$"):
        writer.append({column: 1 for column in CSV_COLUMNS}, intact="; the rest is safe")
    writer.close()
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# Found by fault injection


def test_seeds_resume_never_replaces_a_finished_seed_whose_checkpoint_is_gone(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", epochs=1)) == 0
    capsys.readouterr()
    seed1 = tmp_path / "r_seed1.csv"
    seed1.with_suffix(".pt").unlink()
    before = _snapshot(seed1, seed1.with_suffix(".json"), tmp_path / "r_seed2.pt", tmp_path / "r_summary.csv")
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", "--resume", "--lr", "0.001", epochs=2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed 1" in err and "checkpoint" in err and "--overwrite" in err
    assert _snapshot(*before) == before


def test_seeds_resume_checks_every_seed_before_the_first_trains(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", epochs=1)) == 0
    capsys.readouterr()
    outputs = [path for seed in (1, 2) for path in _outputs(tmp_path / f"r_seed{seed}.csv")]
    before = _snapshot(*outputs, tmp_path / "r_summary.csv")
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1-2", "--resume", "--lr", "0.001", epochs=2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr 0.0002 -> 0.001" in err
    assert _snapshot(*before) == before


def test_a_later_seeds_run_never_replaces_the_summary_without_a_flag(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "1", epochs=1)) == 0
    summary = tmp_path / "r_summary.csv"
    before = summary.read_bytes()
    capsys.readouterr()
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--seeds", "2", epochs=1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r_summary.csv already exists" in err
    assert summary.read_bytes() == before and not (tmp_path / "r_seed2.csv").exists()


def test_a_run_that_died_before_its_first_checkpoint_is_offered_overwrite(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "early.csv"
    csv_path.write_text(",".join(CSV_COLUMNS) + "\n")  # what a run leaves before epoch 1 is saved
    csv_path.with_suffix(".json").write_text("{}")
    for flags in (["--resume"], []):
        assert main_module.main(_args(digits_root, csv_path, *LENET, *flags)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--overwrite" in err, err
        assert "run without --resume" not in err and "add --resume" not in err
    assert main_module.main(_args(digits_root, csv_path, *LENET, "--overwrite", epochs=1)) == 0


SIGNAL_DURING = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import checkpoint, main, run_control
where = sys.argv.pop(1)

def signalled(real, signum, times=1):
    def wrapper(*args):
        for _ in range(times):
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the handler runs in the main thread meanwhile
        return real(*args)
    return wrapper

if where == "three signals":  # in quick succession while the last checkpoint is being written
    real_save = checkpoint.save_checkpoint
    checkpoint.save_checkpoint = lambda path, payload: (signalled(real_save, signal.SIGTERM, 3) if payload["epoch"] == 2
                                                         else real_save)(path, payload)
elif where == "last checkpoint":  # on the writer thread, while the main thread waits for it
    real_save = checkpoint.save_checkpoint
    checkpoint.save_checkpoint = lambda path, payload: (signalled(real_save, signal.SIGTERM) if payload["epoch"] == 2
                                                         else real_save)(path, payload)
elif where == "state staged":  # Slurm's SIGUSR2 halfway through copying epoch 2's state to the host buffers
    real_stage, real_copy = checkpoint.HostStaging.stage, checkpoint.HostStaging._copy

    def stage(self, payload):
        self.epoch = payload["epoch"]
        return real_stage(self, payload)

    def copy(self, value, key):
        if key == ("optimizers",) and self.epoch == 2:  # the networks copied, the optimiser moments not yet
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)  # the handler runs in the main thread meanwhile
        return real_copy(self, value, key)

    checkpoint.HostStaging.stage, checkpoint.HostStaging._copy = stage, copy
else:  # the final confusion picture
    run_control.save_target_confusion = signalled(run_control.save_target_confusion, signal.SIGINT)
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), [("last checkpoint", 143), ("three signals", 143), ("final picture", 130)])
def test_a_signal_during_the_last_writes_finishes_them_and_says_resume(digits_root, tmp_path, where, code):
    csv_path = tmp_path / "late.csv"
    done = subprocess.run([sys.executable, "-c", SIGNAL_DURING.format(root=str(ROOT)), where,
                           *_args(digits_root, csv_path, *LENET, epochs=2)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == code, done.stderr
    assert "hold epochs 1-2" in done.stderr and "--resume" in done.stderr and "Traceback" not in done.stderr
    assert "before training started" not in done.stderr
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 2 and len(_rows(csv_path)) == 2
    assert not list(tmp_path.glob("*.tmp")) and not _lock(csv_path).exists()


@pytest.mark.slow
def test_a_signal_while_an_epochs_state_is_copied_still_resumes_to_the_uninterrupted_csv(deterministic_reference,
                                                                                          digits_root, tmp_path):
    csv_path = tmp_path / "staged.csv"
    args = _args(digits_root, csv_path, "--deterministic", epochs=3, iters=KILLED_ITERS)
    done = subprocess.run([sys.executable, "-c", SIGNAL_DURING.format(root=str(ROOT)), "state staged", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 140 and "hold epochs 1-2" in done.stderr, done.stderr
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--resume"], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert _results(csv_path) == _results(deterministic_reference)


def test_non_finite_weights_are_never_checkpointed_as_good(digits_root, tmp_path, monkeypatch, capsys):
    calls = []
    real_update = algorithms.MCD.update

    def update(self, xs, ys, xt):
        losses = real_update(self, xs, ys, xt)  # finite: the damage comes after them
        calls.append(1)
        if len(calls) == 4:  # the last iteration of epoch 2
            with torch.no_grad():
                next(self.F1.parameters()).fill_(float("inf"))
        return losses

    monkeypatch.setattr(algorithms.MCD, "update", update)
    csv_path = tmp_path / "inf.csv"
    assert main_module.main(_args(digits_root, csv_path, *LENET, epochs=3)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "non-finite weights at the end of epoch 2" in errors[0] and "hold epochs 1-1" in errors[0]
    assert [r["epoch"] for r in _rows(csv_path)] == ["1"] and load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1


@pytest.mark.slow
def test_a_damaged_or_incomplete_checkpoint_is_refused_an_old_one_without_checksum_loads(finished_run, digits_root,
                                                                                        tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    checkpoint = csv_path.with_suffix(".pt")
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside G's weights
    checkpoint.write_bytes(bytes(data))
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err
    assert main_module.main(["--evaluate", str(checkpoint), "--device", "cpu"]) == 2
    assert "is damaged" in capsys.readouterr().err
    assert _snapshot(*_outputs(csv_path)) == before

    payload = torch.load(finished_run.with_suffix(".pt"), weights_only=True)
    torch.save({key: value for key, value in payload.items() if key != "checksum"}, checkpoint)  # as written before
    assert load_checkpoint(checkpoint)["epoch"] == 2
    save_checkpoint(checkpoint, {"format_version": 1, "epoch": 2})
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is incomplete (no config, rows," in err


def test_evaluate_into_a_folder_it_cannot_write_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    import results

    checkpoint = _copy_run(finished_run, tmp_path).with_suffix(".pt")

    def denied(source, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(results.os, "replace", denied)
    assert main_module.main(["--evaluate", str(checkpoint), "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "(permission denied)" in errors[0]
    assert not list(tmp_path.glob("*.tmp"))


def test_failure_causes_are_named_through_the_exception_chain():
    from results import failure_cause

    assert failure_cause(OSError(28, "No space left on device")) == "disk full"
    assert failure_cause(OSError(27, "File too large")) == "file size limit"
    assert failure_cause(MemoryError()) == "out of memory"
    try:
        try:
            raise OSError(27, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8 vs 0")
    except RuntimeError as zip_writer:  # torch's zip writer, failing while the OSError is handled
        assert failure_cause(zip_writer) == "file size limit"
    assert failure_cause(RuntimeError("something\nelse")) == "RuntimeError: something"


# ---------------------------------------------------------------------------------------------------
# What made a run: its command line and the code's version


def test_the_record_names_the_command_line_and_code_and_resume_says_when_either_changed(digits_root, tmp_path,
                                                                                         monkeypatch, capsys):
    csv_path = tmp_path / "made.csv"
    args = _args(digits_root, csv_path, epochs=1)
    assert main_module.main(args) == 0
    record = json.loads(csv_path.with_suffix(".json").read_text())
    assert shlex.split(record["command"]) == ["main.py", *args]
    assert set(record["code"]) in ({"git_commit", "dirty"}, {"files_sha256"})
    assert load_checkpoint(csv_path.with_suffix(".pt"))["provenance"] == {"command": record["command"], "code": record["code"]}
    capsys.readouterr()
    assert main_module.main([*args, "--resume"]) == 0  # the same command again: nothing to say
    assert "note:" not in capsys.readouterr().out
    monkeypatch.setattr(run_control, "provenance", lambda command: {"command": shlex.join(command),
                                                                     "code": {"git_commit": "f" * 40, "dirty": True}})
    assert main_module.main([*args[:-2], "--eval-batch-size", "64", *args[-2:], "--resume", "--epochs", "2"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "another command line" in notes[0] and "--eval-batch-size 64" in notes[0]
    assert "another code" in notes[0] and "ffffffffffff (dirty)" in notes[0]


def test_outside_a_git_checkout_the_code_version_is_a_hash_of_the_python_files(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(results.subprocess, "run", no_git)
    version = results.code_version()
    assert set(version) == {"files_sha256"} and len(version["files_sha256"]) == 64
    assert version == results.code_version()


def test_resume_with_the_other_memory_layout_gives_the_optimiser_state_its_parameters_layout(digits_root, tmp_path):
    # load_state_dict converts dtype and device but not strides; the fused CUDA Adam refuses moments laid out
    # otherwise than their parameter, so every state tensor takes its parameter's layout on loading.
    csv_path = tmp_path / "layout.csv"
    assert main_module.main(_args(digits_root, csv_path, "--channels-last", "off", epochs=1)) == 0
    assert main_module.main(_args(digits_root, csv_path, "--channels-last", "on", "--resume", epochs=2)) == 0
    checkpoint = load_checkpoint(csv_path.with_suffix(".pt"))
    weight = checkpoint["models"]["G.net.4.weight"]  # the 32 -> 48 convolution (G's fifth parameter)
    moments = checkpoint["optimizers"]["G"]["state"][4]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert moments["exp_avg"].stride() == moments["exp_avg_sq"].stride() == weight.stride()
    assert main_module.main(_args(digits_root, csv_path, "--channels-last", "off", "--resume", epochs=3)) == 0
    moments = load_checkpoint(csv_path.with_suffix(".pt"))["optimizers"]["G"]["state"][4]
    assert moments["exp_avg"].is_contiguous() and moments["exp_avg_sq"].is_contiguous()


# ---------------------------------------------------------------------------------------------------
# How often the training state is written: --checkpoint-every MINUTES


@pytest.mark.parametrize(("every", "writes"), [("10", [3]), ("0", [1, 2, 3])])
def test_the_state_is_written_at_the_end_and_every_so_many_minutes(digits_root, tmp_path, monkeypatch, every, writes):
    import checkpoint

    written, real_save = [], checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, payload: written.append(payload["epoch"])
                        or real_save(path, payload))
    csv_path = tmp_path / "sparse.csv"
    assert main_module.main(_args(digits_root, csv_path, "--checkpoint-every", every, epochs=3)) == 0
    assert written == writes and [r["epoch"] for r in _rows(csv_path)] == ["1", "2", "3"]
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 3


def test_a_run_stopped_between_writes_writes_its_last_epoch_and_resumes_exactly(digits_root, tmp_path, monkeypatch,
                                                                               capsys):
    straight, stopped = tmp_path / "straight.csv", tmp_path / "stopped.csv"
    assert main_module.main(_args(digits_root, straight, "--deterministic", epochs=3)) == 0
    real_save_epoch = run_control.RunFiles.save_epoch

    def stop_after_epoch_2(run, row, *args):  # a SIGTERM right after epoch 2, long before the next state is due
        real_save_epoch(run, row, *args)
        if run.epoch == 2:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run_control.RunFiles, "save_epoch", stop_after_epoch_2)
    assert main_module.main(_args(digits_root, stopped, "--deterministic", epochs=3)) == 143
    assert "hold epochs 1-2" in capsys.readouterr().err
    assert load_checkpoint(stopped.with_suffix(".pt"))["epoch"] == 2  # written on the way out
    monkeypatch.undo()
    assert main_module.main(_args(digits_root, stopped, "--deterministic", "--resume", epochs=3)) == 0
    assert _results(stopped) == _results(straight)
