"""Experiments elsewhere: a real local Ray cluster on the CPU (a worker killed mid-experiment
included), and the Modal app's functions called locally, with no network and no credentials."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from quantbench import remote
from quantbench.results import read_json
from tests.conftest import REPO, TINY_RUN_FLAGS

SECRET = "hf_quantbench_test_secret_never_written"


def _files_mention(folder, text):
    return [p for p in Path(folder).rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def _experiment_child(exp_id):
    """The pid of a Ray worker's experiment process for exp_id, and its parent (the worker), if running:
    from the result the experiment writes in the worker's scratch copy of the run folder."""
    import glob

    for path in glob.glob(f"{tempfile.gettempdir()}/quantbench-worker-*/run/{exp_id}.json"):
        try:
            r = json.loads(Path(path).read_text())
            if r.get("status") != "running":
                continue
            ppid = int(Path(f"/proc/{r['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError, KeyError):
            continue
        return r["pid"], ppid
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="finds the Ray worker through /proc")
def test_a_ray_sweep_on_a_local_cluster_survives_a_killed_worker_and_resumes(tiny_model_dir, shared_data, tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "HF_TOKEN": SECRET, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    cmd = [sys.executable, "-m", "quantbench", "run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4,int8",
           "--tasks", "none", "--backend", "ray", "--data-dir", str(shared_data), "--out", str(tmp_path / "r"),
           *TINY_RUN_FLAGS]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill the Ray worker process that runs nf4 while its experiment is under way.
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and driver.poll() is None and killed is None:
        found = _experiment_child("nf4")
        if found:
            os.kill(found[1], signal.SIGKILL)
            killed = found
        time.sleep(0.1)
    out = driver.communicate(timeout=600)[0]
    assert killed, f"never saw nf4's experiment on a Ray worker:\n{out[-3000:]}"
    assert driver.returncode == 0, out[-3000:]
    run_dir = tmp_path / "r" / "run001"
    run = read_json(run_dir / "run.json")
    assert run["config"]["backend"] == "ray" and run["status"] == "finished" and run["device"] == "cpu"
    assert run["device_rates"]["copy_bytes_s"] > 0 and run["launcher_environment"]["host"]
    lost = read_json(run_dir / "nf4.json")
    assert lost["status"] == "failed" and "the ray worker running it failed or was lost" in lost["error"], lost
    assert "--resume" in lost["fix"]
    for exp in ("fp16", "int8"):
        r = read_json(run_dir / f"{exp}.json")
        assert r["status"] == "ok" and r["worker"]["host"], r
        # The workers were sent run.json after the rates were measured: roofline shares as in a local run.
        # (A point may be 'not measurable' when a loaded 2-core machine's noise swamps 8 tokens: seen once.)
        ok = [p for p in r["cost"]["decode"]["eager"].values() if p["status"] == "ok"]
        assert ok and all(p["bandwidth_share"] > 0 for p in ok), r["cost"]["decode"]
    # The baseline's reference came back once and int8 was compared with it on its worker.
    assert (run_dir / "reference").is_dir() and read_json(run_dir / "int8.json")["quality"]["kld"]["same_top_p"] > 0.5
    # Paths in results are the launching machine's, not a worker's scratch folder.
    assert not _files_mention(run_dir, "quantbench-worker-")

    resumed = subprocess.run([sys.executable, "-m", "quantbench", "run", "--resume", str(run_dir)],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    again = read_json(run_dir / "nf4.json")
    assert again["status"] == "ok" and again["quality"]["kld"]["kld_mean"] > 0
    assert again["worker"]["host"]  # resumed on Ray, the run's backend, without naming it again
    assert "| nf4 |" in (run_dir / "summary.md").read_text()
    # The token was in every process's environment and went nowhere.
    assert not _files_mention(run_dir, SECRET) and SECRET not in out + resumed.stdout + resumed.stderr


def test_the_modal_app_runs_experiments_locally_without_network_or_credentials(tiny_model_dir, shared_data, tmp_path,
                                                                               monkeypatch):
    """The same path as a Modal run, minus Modal: pack the run, call the app's functions with
    .local(), write what they return into the run folder."""
    pytest.importorskip("modal")
    pytest.importorskip("bitsandbytes")
    from quantbench import config as settings
    from quantbench import modal_app, sweep
    from quantbench.results import write_files

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "no-modal.toml"))  # no credentials at all
    args = settings.run_parser().parse_args(["--model", str(tiny_model_dir), "--methods", "fp16,nf4",
                                             "--tasks", "none", "--backend", "modal", "--data-dir", str(shared_data),
                                             "--out", str(tmp_path / "r"), *TINY_RUN_FLAGS])
    config = settings.from_args(args)
    run_dir = sweep.create_run(config, tmp_path / "cache", device="cpu")
    run = read_json(run_dir / "run.json")
    files = remote.pack(run_dir, run)
    facts = modal_app.worker_facts.local("cpu")
    assert facts["device_rates"]["copy_bytes_s"] > 0 and facts["environment"]["python"]

    write_files(run_dir, modal_app.run_experiment.local(files, "fp16"))
    reference = remote.reference_files(run_dir, run["models"][0]["name"])
    assert reference and all(k.startswith("run/reference/") for k in reference)
    write_files(run_dir, modal_app.run_experiment.local(files, "nf4", reference))
    for exp in ("fp16", "nf4"):
        r = read_json(run_dir / f"{exp}.json")
        assert r["status"] == "ok" and r["cost"]["weight_bytes"] > 0, r
    assert read_json(run_dir / "nf4.json")["quality"]["kld"]["kld_mean"] > 0
    assert sweep.finish(run_dir, interrupted=False) == 0 and (run_dir / "report.html").exists()
    assert not _files_mention(run_dir, SECRET) and not _files_mention(run_dir, "quantbench-worker-")
    # The app as Modal would run it: the card, the time limit, the cache volume and the hub secret.
    assert modal_app.OPTIONS["gpu"] == "A100" and modal_app.OPTIONS["volumes"] and modal_app.OPTIONS["secrets"]


def test_backend_flags_are_checked_before_anything_runs(tmp_path, capsys):
    from quantbench import cli

    for argv, message in [(["--gpu", "H100"], "--gpu picks Modal's card"),
                          (["--ray-address", "ray://head:10001"], "--ray-address is for --backend ray")]:
        code = cli.main(["run", "--methods", "fp16", "--out", str(tmp_path / "r"), *argv])
        assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_an_unreachable_ray_cluster_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("ray")
    from quantbench import cli

    code = cli.main(["run", "--methods", "fp16", "--backend", "ray", "--ray-address", "127.0.0.1:1",
                     "--out", str(tmp_path / "r")])
    assert code == 2 and "no Ray cluster answers at 127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_experiments_timed_side_by_side_on_one_host_are_flagged(tmp_path):
    from quantbench.results import write_json

    spans = {"a": ("gpu-host", "00:00", "00:10"), "b": ("gpu-host", "00:05", "00:15"),
             "c": ("other-host", "00:05", "00:15"), "d": ("gpu-host", "00:20", "00:30")}
    for exp, (host, start, end) in spans.items():
        write_json(tmp_path / f"{exp}.json", {"experiment": exp, "worker": {"host": host},
                                              "started": f"2026-11-27T01:{start}+00:00", "finished": f"2026-11-27T01:{end}+00:00"})
    write_json(tmp_path / "e.json", {"experiment": "e"})  # a local result: no worker, never flagged
    remote.flag_shared_hosts(tmp_path, {"experiments": [{"id": e} for e in "abcde"]})
    got = {e: read_json(tmp_path / f"{e}.json").get("shared_host_with") for e in "abcde"}
    assert got == {"a": ["b"], "b": ["a"], "c": None, "d": None, "e": None}


def test_the_include_path_travels_to_the_worker_with_its_data(tiny_model_dir, tmp_path, monkeypatch):
    """A worker runs the user's task from the packed copy of the include path (the original is gone by
    then), its YAML's paths to data files beside it pointing into that copy."""
    from quantbench import config as settings
    from quantbench import sweep
    from tests.test_sweep import TASKS_ONLY
    from tests.test_tasks import sums_task

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    folder = sums_task(tmp_path / "my-tasks")
    args = settings.run_parser().parse_args(["--model", str(tiny_model_dir), "--methods", "fp16", "--tasks", "sums",
                                             "--include-path", str(folder), "--out", str(tmp_path / "r"), *TASKS_ONLY])
    run_dir = sweep.create_run(settings.from_args(args), tmp_path / "cache", device="cpu", hub=False)
    files = remote.pack(run_dir, read_json(run_dir / "run.json"))
    assert {"include/sums.yaml", "include/train.jsonl", "include/test.jsonl"} <= set(files)
    folder.rename(tmp_path / "moved")
    out = remote.run_packed(files, "fp16")
    r = json.loads(out["fp16.json"])
    assert r["status"] == "ok", r.get("error")
    assert r["quality"]["sums"]["n"] == 10 and "fp16.docs.json" in out
