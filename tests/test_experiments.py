"""Every experiments/ script runs end to end in its smoke mode (a few hundred images, 1 epoch).

The scripts run in this process (tests/scripts.py: as `python script.py ...` would, without
a fresh interpreter's seconds of imports); the processes they start are real."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import run_script

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]


def run_smoke(name, tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    out = tmp_path / "figures"
    proc = run_script(
        [sys.executable, str(REPO / "experiments" / name), "--smoke", "--runs", str(tmp_path / "runs"),
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def non_empty_pngs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png") if p.stat().st_size > 0)


@pytest.mark.slow
def test_figures_script_smoke(tmp_path, data_dir):
    out, stdout = run_smoke("figures.py", tmp_path, data_dir)
    assert non_empty_pngs(out) == sorted(
        ["comparison.png", "z2/latent.png", "z2/manifold.png"]
        + [f"z50/{k}.png" for k in ("latent", "samples", "reconstructions", "interpolation", "dims", "curves")]
    )
    assert stdout.count("$ pyro-vae train") == 4  # the commands are printed for the docs


@pytest.mark.slow
def test_checkpoint_cost_script_smoke(tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    proc = run_script([sys.executable, str(REPO / "experiments" / "checkpoint_cost.py"), "--smoke", "--every", "5",
                           "--json", str(tmp_path / "cost.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["saves"] == 2 + 3  # two epoch ends, and steps 5, 10, 15 of the second run's 16
    assert 0 < cost["median_save_s"] < cost["epoch_s"]
    assert "overhead of the default clock (10min)" in proc.stdout


@pytest.mark.slow
def test_posterior_collapse_script_smoke(tmp_path, data_dir):
    out, stdout = run_smoke("posterior_collapse.py", tmp_path, data_dir)
    assert "kl-profile.png" in non_empty_pngs(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["run"] for s in summary] == ["beta-0.5", "beta-1", "beta-1-warmup-1", "beta-4", "kl-only"]
    for s in summary:
        assert 0 <= s["active_units"] <= s["z_dim"] == 50
        assert s["test_elbo"] == pytest.approx(s["test_log_lik"] - s["test_kl"], abs=1e-3)
    assert "| active units |" in stdout


@pytest.mark.slow
def test_iwae_table_script_smoke(tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    runs = tmp_path / "runs"
    command = [sys.executable, str(REPO / "experiments" / "iwae_table.py"), "--smoke", "--runs", str(runs)]
    proc = run_script(command + ["--rows", "1-vae-1", "2-iwae-5"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"iwae_table.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("$ pyro-vae train") == 2  # the commands are printed for the docs
    one, two = (json.loads((runs / row / "iwae-table.json").read_text()) for row in ("1-vae-1", "2-iwae-5"))
    assert one["units"] == {"z": 5} and two["units"] == {"z1": 8, "z2": 4}
    assert two["config"]["train"]["estimator"] == "iwae" and two["config"]["train"]["num_particles"] == 5
    for row, r in (("1-vae-1", one), ("2-iwae-5", two)):
        assert r["num_samples"] == 10 and r["num_test_images"] == 100 and r["epochs"] == 1
        assert 0 < r["nll"] < 784 * 0.7 and r["nll_stderr"] > 0  # below a coin per pixel
        per_image = torch.load(runs / row / "iwae-table-log-px.pt")  # kept for paired comparisons of rows
        assert per_image.shape == (100,) and per_image.dtype == torch.float64
        assert abs(-float(per_image.mean()) - r["nll"]) < 1e-9
    table = (runs / "table.md").read_text()
    assert table.count("\n") == 12 and table.count("not yet") == 8
    # a second call trains nothing (both rows are finished and evaluated) and prints the same table
    again = run_script(command + ["--rows", "1-vae-1", "2-iwae-5"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "$ pyro-vae train" not in again.stdout and table.strip() in again.stdout
    # the archive to commit: a finished row without its weights, an unfinished one with its checkpoint
    (runs / "1-vae-1" / "iwae-table.json").rename(runs / "1-vae-1" / "later.json")  # as if not yet evaluated
    done = run_script(command + ["--archive", str(tmp_path / "kept")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "copied into" in done.stdout and "1-vae-1 2-iwae-5" in done.stdout
    assert sorted(p.name for p in (tmp_path / "kept" / "1-vae-1").iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.jsonl", "versions.json"]
    assert sorted(p.name for p in (tmp_path / "kept" / "2-iwae-5").iterdir()) == [
        "config.json", "iwae-table-log-px.pt", "iwae-table.json", "metrics.jsonl", "versions.json"]
    # copied back into another runs folder (a new machine), the unfinished row resumes there
    moved = tmp_path / "new-machine"
    shutil.copytree(tmp_path / "kept", moved)
    more = run_script([*command[:-1], str(moved), "--rows", "1-vae-1", "--epochs", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming" in more.stderr + more.stdout and "after epoch 1" in more.stderr + more.stdout
    assert [m["epoch"] for m in map(json.loads, (moved / "1-vae-1" / "metrics.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.slow
def test_distributed_bench_script_smoke(tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir))
    out = tmp_path / "bench"
    proc = run_script([sys.executable, str(REPO / "experiments" / "distributed_bench.py"), "--smoke", "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"distributed_bench.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "distributed-bench.json").read_text())
    assert len(result["epoch_seconds_one"]) == len(result["epoch_seconds_many"]) == 1
    assert result["train_epoch_ratio"] > 0 and result["evaluate_ratio"] > 0
    assert "| training loop, s per epoch" in proc.stdout
    # The distributed evaluation gives every image the single process's draws: the whole
    # report agrees (the script compares only the means), every number to float32 rounding
    # of the per-image values (1e-6 of their size; the thread counts differ), which is far
    # below what other draws would move it (the Monte Carlo error)
    one, many = result["evaluation_one"], result["evaluation_many"]
    assert one.keys() == many.keys() and {"elbo", "log_lik", "kl", "log_px_is10"} <= one.keys()
    assert one["num_images"] == 20
    for key, value in one.items():
        if isinstance(value, dict) and "mean" in value:
            size = abs(value["mean"])
            for stat in ("mean", "stderr", "mc_stderr"):
                assert abs(many[key][stat] - value[stat]) <= 1e-6 * size, (key, stat, value, many[key])
        else:  # the run, its epoch, the number of images, the active units: exactly
            assert many[key] == value, key
    assert one["log_px_is10"]["mc_stderr"] > 100 * 1e-6 * abs(one["log_px_is10"]["mean"])


@pytest.mark.slow
def test_cvae_vs_pyro_script_smoke(tmp_path, data_dir):
    """One epoch of Pyro's CVAE example and of ours, timed side by side (tiny networks, 300 images)."""
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    out = tmp_path / "times.json"
    proc = run_script([sys.executable, str(REPO / "experiments" / "cvae_vs_pyro.py"), "--smoke", "--json",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cvae_vs_pyro.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    times = json.loads(out.read_text())
    assert times["images"] == 300 and len(times["rounds"]["pyro example"]) == len(times["rounds"]["pyro_vae"]) == 1
    for side in ("pyro example", "pyro_vae"):
        assert 0 < times["median"][side]["steps"] < times["median"][side]["epoch"]
    ours, theirs = times["rounds"]["pyro_vae"][0], times["rounds"]["pyro example"][0]
    # both trained the same task: a loss per image below a coin per hidden pixel (588 of them)
    assert 0 < -ours["train_elbo"] < 588 * 0.7 and 0 < theirs["last_loss_per_image"] < 588 * 0.7
    assert "| SVI steps |" in proc.stdout and "| whole epoch" in proc.stdout


@pytest.mark.slow
def test_cvae_table_script_smoke(tmp_path, data_dir):
    """The tutorial's table for 1 quadrant: baseline and CVAE trained, evaluated, tabled; a second
    call trains and evaluates nothing again."""
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    runs = tmp_path / "runs"
    command = [sys.executable, str(REPO / "experiments" / "cvae_table.py"), "--smoke", "--runs", str(runs),
               "--quadrants", "1", "--json", str(tmp_path / "rows.json")]
    proc = run_script(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cvae_table.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("$ pyro-vae train") == 2  # the commands are printed for the docs
    rows = json.loads((tmp_path / "rows.json").read_text())["1"]
    assert rows["baseline"]["particles"] == 1 and rows["cvae"]["particles"] == 2
    cvae = rows["cvae"]
    assert cvae["is_num_samples"] == 10 and cvae["num_test_images"] == cvae["is_test_images"] == 100
    assert cvae["neg_log_px_is"] <= cvae["neg_elbo_is_images"] + 3 * cvae["is_gain_stderr"]
    table = (runs / "cvae-table.md").read_text()
    assert "(tutorial 71.8)" in table and "(tutorial 100.4)" in table and "IS K = 10" in table
    again = run_script(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "has finished its 1 epoch" in again.stdout
    assert table.strip() in again.stdout
    stored = json.loads((runs / "cvae-q1" / "cvae-table.json").read_text())
    assert len(stored) == 1  # evaluated once


def test_softplus_forms_script_smoke(tmp_path):
    out = tmp_path / "softplus.json"
    proc = run_script([sys.executable, str(REPO / "experiments" / "softplus_forms.py"), "--rounds", "1",
                           "--calls", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 * 7 and all(r["ns_per_element"] > 0 for r in rows)
    assert {r["case"] for r in rows} >= {"torch softplus", "exp/log form, forward + backward"}
    assert json.loads(out.read_text())["pyro_vae_form"] in ("torch", "exp-log")


@pytest.mark.slow
def test_softplus_step_script_smoke():
    proc = run_script([sys.executable, str(REPO / "experiments" / "softplus_step.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert len(row) == 1 and all(float(cell) > 0 for cell in row[0].strip("| ").split(" | ")[1:])


@pytest.mark.slow
@pytest.mark.parametrize("form", ["torch", "exp-log"])
def test_profile_is_script_smoke(form):
    args = ["--images", "4", "--samples", "40", "--rows", "200", "--softplus", form]
    proc = run_script([sys.executable, str(REPO / "experiments" / "profile_is.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aten::addmm" in proc.stdout or "aten::linear" in proc.stdout
    assert ("aten::softplus" in proc.stdout) == (form == "torch")


def test_iwae_table_pairs_rows_by_test_image(tmp_path):
    """The difference of two rows' NLL with the standard error of the per-image differences."""
    sys.path.insert(0, str(REPO / "experiments"))
    from iwae_table import PER_IMAGE, paired_differences

    for row, values in [("1-iwae-50", [-80.0, -90.0, -100.0, -110.0]), ("1-vae-50", [-81.0, -92.0, -100.5, -111.5]),
                        ("2-iwae-50", [-70.0, -81.0, -89.0, -100.0])]:  # 2-vae-50 missing: its pair is left out
        (tmp_path / row).mkdir()
        torch.save(torch.tensor(values, dtype=torch.float64), tmp_path / row / PER_IMAGE)
    # differences 1, 2, 0.5, 1.5: mean 1.25, sample std sqrt(0.41667) = 0.6455, s.e. 0.3227;
    # one layer minus two: 10, 9, 11, 10: mean 10, sample std sqrt(2/3) = 0.8165, s.e. 0.4082
    assert paired_differences(tmp_path) == ("- NLL of 1-vae-50 minus NLL of 1-iwae-50: 1.25 +- 0.32 nats "
                                            "(paired over 4 test images)\n"
                                            "- NLL of 1-iwae-50 minus NLL of 2-iwae-50: 10.00 +- 0.41 nats "
                                            "(paired over 4 test images)")


def test_iwae_table_lists_the_copies_of_a_long_row_with_their_paired_gains(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    from iwae_table import PER_IMAGE, RESULT, snapshot_lines

    for epoch, values, nll in [(13, [-100.0, -90.0, -80.0], 90.0), (4, [-102.0, -91.0, -82.5], 91.83),
                               (121, [-99.0, -88.5, -79.0], 88.83)]:
        copy = tmp_path / f"at-{epoch}" / "1-vae-1"
        copy.mkdir(parents=True)
        (copy / RESULT).write_text(json.dumps({"row": "1-vae-1", "epochs": epoch, "nll": nll, "nll_stderr": 5.77,
                                               "active_units": {"z": 3}}))
        torch.save(torch.tensor(values, dtype=torch.float64), copy / PER_IMAGE)
    # 13 against 4: gains 2, 1, 2.5, mean 1.833, s.e. sqrt(0.58333 / 3) = 0.441;
    # 121 against 13: gains 1, 1.5, 1, mean 1.167, s.e. sqrt(0.08333 / 3) = 0.167
    assert snapshot_lines(tmp_path).splitlines() == [
        "- 1-vae-1 after epoch 4 (in at-4/): NLL 91.83 +- 5.77 nats, active units {'z': 3}",
        "- 1-vae-1 after epoch 13 (in at-13/): NLL 90.00 +- 5.77 nats, active units {'z': 3}; "
        "1.83 +- 0.44 lower than in at-4/ (paired)",
        "- 1-vae-1 after epoch 121 (in at-121/): NLL 88.83 +- 5.77 nats, active units {'z': 3}; "
        "1.17 +- 0.17 lower than in at-13/ (paired)"]


ARCHIVE = REPO / "archive" / "iwae-table-runs"  # the committed run folders (README there)


@pytest.mark.slow
def test_iwae_table_finds_and_resumes_the_committed_runs(tmp_path, data_dir):
    """The folders under archive/iwae-table-runs, copied out as their README says, are the
    script's runs: the evaluated rows are tabled, and the unfinished whole-schedule row
    resumes from its checkpoint (here to the end of the epoch it stopped in)."""
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    script = [sys.executable, str(REPO / "experiments" / "iwae_table.py")]
    table = tmp_path / "iwae-table"
    shutil.copytree(ARCHIVE / "100-epochs", table)
    proc = run_script(script + ["--runs", str(table), "--table-only"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in sorted(p.name for p in (ARCHIVE / "100-epochs").iterdir() if (p / "iwae-table.json").exists()):
        nll = json.loads((table / row / "iwae-table.json").read_text())["nll"]
        assert f"| {nll:.2f} +- " in proc.stdout, row
    full = tmp_path / "iwae-full"
    shutil.copytree(ARCHIVE / "3280-epochs", full)
    before = (full / "1-vae-1" / "metrics.jsonl").read_text().splitlines()
    epoch = json.loads(before[-1])["epoch"]
    proc = run_script(script + ["--runs", str(full), "--rows", "1-vae-1", "--epochs", str(epoch + 1),
                                    "--eval-samples", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {full / '1-vae-1'} after epoch {epoch + 1}, step " in proc.stderr + proc.stdout
    after = (full / "1-vae-1" / "metrics.jsonl").read_text().splitlines()
    assert after[:-1] == before and json.loads(after[-1])["epoch"] == epoch + 1


@pytest.mark.parametrize("mode", [["--table-only"], ["--archive", "kept"]])
def test_iwae_table_refuses_a_runs_folder_that_is_not_there(tmp_path, mode):
    proc = run_script([sys.executable, str(REPO / "experiments" / "iwae_table.py"), "--runs",
                           str(tmp_path / "typo"), *mode], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--runs {tmp_path / 'typo'} is not a folder: give the folder that holds the rows' runs" in proc.stderr
    assert not (tmp_path / "kept").exists()


@pytest.mark.slow
def test_iwae_table_archive_leaves_out_a_row_that_is_training(tmp_path):
    """A row whose run folder another process holds (it trains) is not copied: its copy
    could pair a checkpoint with metrics from another step. Its earlier copy stays."""
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    for row in ("1-vae-1", "2-vae-1"):
        (runs / row).mkdir(parents=True)
        for name, text in (("config.json", "{}"), ("versions.json", "{}"), ("metrics.jsonl", ""),
                           ("checkpoint.pt", f"{row} now")):
            (runs / row / name).write_text(text)
    (kept / "1-vae-1").mkdir(parents=True)
    (kept / "1-vae-1" / "checkpoint.pt").write_text("1-vae-1 before")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pyro_vae.runs import run_lock\n"
                               f"with run_lock({str(runs / '1-vae-1')!r}):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_script([sys.executable, str(REPO / "experiments" / "iwae_table.py"), "--runs", str(runs),
                               "--archive", str(kept)], capture_output=True, text=True, timeout=300)
    finally:
        holder.communicate("", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"copied into {kept}: 2-vae-1" in proc.stdout
    assert f"1-vae-1 is training (another process holds {runs / '1-vae-1'}): not copied" in proc.stderr
    assert (kept / "1-vae-1" / "checkpoint.pt").read_text() == "1-vae-1 before"
    assert (kept / "2-vae-1" / "checkpoint.pt").read_text() == "2-vae-1 now"
    again = run_script([sys.executable, str(REPO / "experiments" / "iwae_table.py"), "--runs", str(runs),
                            "--archive", str(kept)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (kept / "1-vae-1" / "checkpoint.pt").read_text() == "1-vae-1 now"


def _fake_run(folder, test_elbos, evaluated=None):
    """A run folder with per-epoch metrics, and, when ``evaluated`` = (nll, s.e.), its table result."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e + 1, "test_elbo": v, "seconds": 1.0}) for e, v in enumerate(test_elbos)]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if evaluated is not None:
        result = {"epochs": len(test_elbos), "nll": evaluated[0], "nll_stderr": evaluated[1], "num_samples": 5000,
                  "config": {"train": {"lr": 1e-3}}}
        (folder / "iwae-table.json").write_text(json.dumps(result))
    return folder


@pytest.mark.slow
def test_schedule_curve_draws_a_run_and_refuses_snapshots_of_another(tmp_path):
    elbos = [-120.0 + 2 * e for e in range(13)]
    run = _fake_run(tmp_path / "run", elbos)
    at4 = _fake_run(tmp_path / "at4", elbos[:4], evaluated=(100.5, 0.3))
    at13 = _fake_run(tmp_path / "at13", elbos, evaluated=(93.0, 0.2))
    other = _fake_run(tmp_path / "other", [v - 0.5 for v in elbos[:4]], evaluated=(99.0, 0.3))  # another run
    script = [sys.executable, str(REPO / "experiments" / "schedule_curve.py"), str(run)]
    out = tmp_path / "curve.png"
    proc = run_script(script + ["--evaluated", str(at13), str(at4), "--paper", "90", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    sys.path.insert(0, str(REPO / "experiments"))
    from schedule_curve import curve_points

    metrics, results = curve_points(run, [at13, at4])
    assert [m["epoch"] for m in metrics] == list(range(1, 14)) and [r["epochs"] for r in results] == [4, 13]
    bad = run_script(script + ["--evaluated", str(other), "--out", str(tmp_path / "bad.png")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "bad.png").exists()
    assert f"{other} is not a copy of {run} at epoch 4" in bad.stderr
    unevaluated = run_script(script + ["--evaluated", str(run), "--out", str(tmp_path / "bad.png")],
                                 capture_output=True, text=True, timeout=300)
    assert unevaluated.returncode == 2 and "has no iwae-table.json: evaluate the snapshot first" in unevaluated.stderr
    typo = run_script([sys.executable, str(REPO / "experiments" / "schedule_curve.py"), str(tmp_path / "rnu"),
                           "--out", str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and not (tmp_path / "bad.png").exists()
    assert f"{tmp_path / 'rnu'} has no metrics.jsonl: give a run folder" in typo.stderr


@pytest.mark.slow
def test_iwae_table_evaluates_a_long_row_on_the_way(tmp_path, data_dir):
    """--evaluate-at: the row stops at the epoch, a copy of it is evaluated, training goes on
    from there as if it had not stopped; the copy is tabled and archived with its row."""
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    runs = tmp_path / "runs"
    command = [sys.executable, str(REPO / "experiments" / "iwae_table.py"), "--smoke", "--runs", str(runs),
               "--rows", "1-vae-1", "--epochs", "3"]
    proc = run_script(command + ["--evaluate-at", "2", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = [json.loads(line) for line in (runs / "1-vae-1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in run] == [1, 2, 3]
    for epoch in (1, 2):
        copy = runs / f"at-{epoch}" / "1-vae-1"
        result = json.loads((copy / "iwae-table.json").read_text())
        assert result["epochs"] == epoch and result["num_test_images"] == 100
        assert [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()] == run[:epoch]
        assert f"1-vae-1 after epoch {epoch}: test NLL {result['nll']:.2f}" in proc.stdout
    assert not list(runs.glob("at-*/*.partial"))
    # one run trained straight to 3 epochs: the same numbers (stopping at 1 and 2 changed nothing)
    straight = tmp_path / "straight"
    again = run_script([*command[:4], str(straight), *command[5:]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["test_elbo"] for line in (straight / "1-vae-1" / "metrics.jsonl").read_text().splitlines()] \
        == [m["test_elbo"] for m in run]
    # the table lists the copies; the archive keeps them (evaluated: without weights)
    table = run_script(command[:5] + ["--table-only"], env=env, capture_output=True, text=True, timeout=300)
    assert "- 1-vae-1 after epoch 1 (in at-1/): NLL" in table.stdout
    assert table.stdout.index("after epoch 1 (in at-1/)") < table.stdout.index("after epoch 2 (in at-2/)")
    kept = run_script(command[:5] + ["--archive", str(tmp_path / "kept")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "1-vae-1 at-1/1-vae-1 at-2/1-vae-1" in kept.stdout
    assert not (tmp_path / "kept" / "at-1" / "1-vae-1" / "checkpoint.pt").exists()
    # an epoch the run has passed cannot be copied any more: said, not silently skipped
    shutil.rmtree(runs / "at-1")
    late = run_script(command + ["--evaluate-at", "1", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert late.returncode == 0 and "$ pyro-vae train" not in late.stdout  # at-2 is there, the row is finished
    assert "row 1-vae-1: past epoch 1 already (3 trained) and no copy of it" in late.stderr
    assert not (runs / "at-1" / "1-vae-1").exists()
    wrong = run_script(command + ["--evaluate-at", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--evaluate-at 3: each epoch must lie between 1 and --epochs - 1" in wrong.stderr


@pytest.mark.slow
def test_compare_checkouts_smoke(tmp_path):
    """The before/after timing runs (this checkout against itself) and both compute the same ELBO."""
    proc = run_script([sys.executable, str(REPO / "experiments" / "compare_checkouts.py"), "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("before", "after"))]
    assert len(lines) == 2 and lines[0].split("(elbo")[1] == lines[1].split("(elbo")[1]
    bad = run_script([sys.executable, str(REPO / "experiments" / "compare_checkouts.py"), "--before",
                          str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "is not a checkout of pyro_vae" in bad.stderr


@pytest.mark.slow
def test_m2_vs_pyro_script_smoke(tmp_path, data_dir):
    """pyro_vae's M2 and Pyro's ss_vae_M2.py (imported from the peers' folder) each train two tiny
    epochs; the report has both times and our accuracy (no timing is asserted)."""
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    out = tmp_path / "report.json"
    proc = run_script([sys.executable, str(REPO / "experiments" / "m2_vs_pyro.py"), "--smoke", "--runs",
                           str(tmp_path / "runs"), "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"m2_vs_pyro.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["labels"] == 100 and len(report["pyro_vae_seconds"]) == len(report["pyro_seconds"]) == 1
    assert report["pyro_vae_seconds"][0] > 0 and report["pyro_seconds"][0] > 0
    assert 0 <= report["pyro_vae_test_accuracy_after_two_epochs"] <= 1


@pytest.mark.slow
def test_m2_table_script_smoke_trains_resumes_and_tables(tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    script = [sys.executable, str(REPO / "experiments" / "m2_table.py"), "--runs", str(tmp_path / "runs")]
    proc = run_script(script + ["--smoke", "--json", str(tmp_path / "table.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"m2_table.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [row] = json.loads((tmp_path / "table.json").read_text())
    assert row["labels"] == 100 and row["label_sets"] == 1 and row["epochs"] == [1]
    assert 0 <= row["accuracy"] <= 1 and row["tutorial"] == [0.9319, 0.006]
    assert json.loads((tmp_path / "runs" / "m2-100-s0" / "labelled.json").read_text())["labels"] == 100
    again = run_script(script + ["--table-only", "--labels", "100", "600", "--seeds", "0"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "| 600 | 0 | - | not yet measured |" in again.stdout


@pytest.mark.parametrize("script", ["m2_table.py", "cvae_table.py"])
@pytest.mark.parametrize("code, says", [(128 + 15, "stopped; "), (1, "failed")])
def test_a_table_script_says_stopped_when_its_training_was_stopped_and_failed_when_it_failed(script, code, says,
                                                                                            monkeypatch, capsys):
    import runpy

    import pyro_vae.cli

    monkeypatch.setattr(pyro_vae.cli, "main", lambda argv: code)  # what SIGTERM (or an error) makes train return
    module = runpy.run_path(str(REPO / "experiments" / script))
    with pytest.raises(SystemExit) as stop:
        if script == "m2_table.py":
            module["train"](Path("runs"), 100, 0, 1, True, None)
        else:
            module["train"](["--out", "runs/x"])
    message = f"{stop.value.code} {capsys.readouterr().err}"
    assert says in message and ("failed" in message) == (code == 1)
    if code > 128:
        assert stop.value.code == code  # the signal's exit status goes on to whoever ran the script


def test_startup_script_stops_train_and_evaluate_at_their_first_step_and_leaves_no_run(tmp_path, data_dir):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir))
    proc = run_script([sys.executable, str(REPO / "experiments" / "startup.py"), "--repeats", "1",
                           "--train-limit", "200", "--test-limit", "50"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, evaluate = proc.stdout.splitlines()
    assert train.startswith("train: ") and evaluate.startswith("evaluate: ")
    torch_pyro, to_first_step, dynamo, own = (float(n) for n in re.findall(r"\d+\.\d+", train))
    assert torch_pyro > 0 and dynamo > 0 and own > 0
    assert to_first_step == pytest.approx(dynamo + own, abs=0.011)  # (each printed to 0.01 s)
    # evaluate builds no optimiser: torch._dynamo is not imported, and its own time is all of it
    assert "0 s (not imported)" in evaluate
    torch_pyro, to_first_step, own = (float(n) for n in re.findall(r"\d+\.\d+", evaluate))
    assert to_first_step == own > 0
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
