"""The preloaded server that forks the experiments: its protocol, and the sweep's fallback without it."""
import json
import os
import signal

from quantbench import cli, forkserver
from tests.conftest import TINY_RUN_FLAGS


def test_children_are_forked_after_the_imports_and_their_exit_codes_come_back(tmp_path):
    server = forkserver.start(preload=["json", "quantbench.experiment"])
    try:
        assert forkserver.ready(server), server["problem"]
        assert server["ready"]["preloaded"] == ["json", "quantbench.experiment"]
        assert server["ready"]["cuda_initialized"] is False
        assert forkserver.run(server, tmp_path / "no-such-run", "fp16") == 1  # no run.json: the child fails
        assert forkserver.run(server, tmp_path / "no-such-run", "nf4") == 1  # and the server forks the next
    finally:
        forkserver.stop(server)
    assert server["process"].poll() is not None


def test_quantbench_forkserver_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("QUANTBENCH_FORKSERVER", "0")
    assert forkserver.start() is None


def test_without_the_server_each_experiment_starts_its_own_interpreter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(forkserver, "PRELOAD", ["quantbench_no_such_module"])  # its imports fail
    code = cli.main(["run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4", "--tasks", "none",
                     "--out", str(tmp_path), *TINY_RUN_FLAGS])
    assert code == 0
    assert "the preloaded server ended during its imports" in capsys.readouterr().out
    for name in ["fp16", "nf4"]:
        result = json.loads((tmp_path / "run001" / f"{name}.json").read_text())
        assert result["status"] == "ok" and result["process"] == "its own interpreter"


def test_a_server_that_dies_mid_run_costs_one_experiment_and_the_rest_run_without_it(tiny_model_dir, tmp_path):
    from tests.test_sweep import load, start, status, wait_for

    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4,fp4", "--tasks", "none",
              "--out", str(tmp_path), *TINY_RUN_FLAGS)
    run_dir = tmp_path / "run001"
    victim = wait_for(lambda: (r := status(run_dir / "nf4.json")) and r.get("status") == "running" and r)
    server_pid = int(open(f"/proc/{victim['pid']}/stat").read().rsplit(")", 1)[1].split()[1])  # its parent
    os.kill(server_pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    nf4 = load(run_dir / "nf4.json")
    assert nf4["status"] == "failed" and "preloaded server" in nf4["error"] and "--resume" in nf4["fix"]
    assert "each experiment starts its own interpreter instead" in out
    assert load(run_dir / "fp16.json")["process"] == "forked from the preloaded server"
    fp4 = load(run_dir / "fp4.json")
    assert fp4["status"] == "ok" and fp4["process"] == "its own interpreter"
