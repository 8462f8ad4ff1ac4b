"""Bad input: one line saying what is wrong and what to do, exit code 2, nothing written."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def quantbench(*args, env=None, cwd=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantbench", *args], capture_output=True, text=True,
                          env=e, cwd=cwd or REPO, timeout=300)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantbench: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "results"


def test_unknown_method(out):
    r = quantbench("run", "--methods", "fp16,nf5", "--out", str(out))
    assert_one_line_error(r, "unknown method 'nf5'", "nf4")
    assert not out.exists()


def test_unknown_task(tiny_model_dir, out):
    r = quantbench("run", "--model", str(tiny_model_dir), "--tasks", "coqa,not_a_task", "--out", str(out))
    assert_one_line_error(r, "not_a_task")
    assert not out.exists()


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_limit_must_be_positive(limit, out):
    r = quantbench("run", "--limit", limit, "--out", str(out))
    assert_one_line_error(r, "--limit", "positive")


def test_model_id_that_does_not_exist(out):
    r = quantbench("run", "--model", "no-such-org/no-such-model-xyz", "--tasks", "none", "--out", str(out))
    assert_one_line_error(r, "no-such-org/no-such-model-xyz")
    assert not out.exists()


def test_model_path_without_weights(tmp_path, out):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    r = quantbench("run", "--model", str(tmp_path / "empty"), "--tasks", "none", "--out", str(out))
    assert_one_line_error(r, "no *.safetensors")
    r = quantbench("run", "--model", str(tmp_path / "missing"), "--tasks", "none", "--out", str(out))
    assert_one_line_error(r, "no directory")


def test_unwritable_out(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = quantbench("run", "--model", str(tiny_model_dir), "--tasks", "none", "--out", str(blocker / "sub"))
    assert_one_line_error(r, "cannot write results")


def test_corrupt_and_foreign_resume_folders(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{not json")
    (corrupt / "fp16.json").write_text("{}")
    before = {p.name: p.read_text() for p in corrupt.iterdir()}
    assert_one_line_error(quantbench("run", "--resume", str(corrupt)), "corrupt")
    assert {p.name: p.read_text() for p in corrupt.iterdir()} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "run.json").write_text(json.dumps({"some": "other tool"}))
    assert_one_line_error(quantbench("run", "--resume", str(foreign)), "not written by quantbench")
    assert_one_line_error(quantbench("run", "--resume", str(tmp_path / "nothing")), "no such folder")
    assert_one_line_error(quantbench("run", "--resume", str(tmp_path)), "no run.json")


def test_bad_config_file_names_the_line(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("methods: [fp16]\nlimits: 4\n")
    assert_one_line_error(quantbench("run", "--config", str(f)), "sweep.yaml:2", "unknown key 'limits'")


def test_bad_compute_dtype(out):
    r = quantbench("run", "--compute-dtype", "fp8", "--out", str(out))
    assert r.returncode == 2 and "--compute-dtype" in r.stderr and "float16" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_dir(out):
    assert_one_line_error(quantbench("run", "--data-dir", "/no/such/dir", "--out", str(out)), "--data-dir")


def test_methods_lists_every_method_and_whether_it_runs_here():
    r = quantbench("methods")
    assert r.returncode == 0
    for name in ["baseline", "fp16", "nf4", "fp4", "int8", "nf4-nodq", "nf4-bf16", "bnb_4bit_nf4 = nf4"]:
        assert name in r.stdout
    assert "runs here (cpu)" in r.stdout and "quantbench[bnb]" in r.stdout


def test_bad_include_paths_and_prompting_flags(tiny_model_dir, tmp_path, out):
    assert_one_line_error(quantbench("run", "--include-path", str(tmp_path / "nowhere"), "--out", str(out)),
                          f"--include-path {tmp_path / 'nowhere'}: no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(quantbench("run", "--model", str(tiny_model_dir), "--include-path", str(tmp_path / "empty"),
                                     "--tasks", "none", "--out", str(out)), "holds no lm-eval task YAML")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mine.yaml").write_text("task: mine\ndataset_path: json\n  output_type: [multiple_choice\n")
    assert_one_line_error(quantbench("run", "--model", str(tiny_model_dir), "--include-path", str(tmp_path / "mine"),
                                     "--tasks", "mine", "--out", str(out)),
                          "lm-eval reads no task from its YAML files", f"{tmp_path / 'mine' / 'mine.yaml'}: ScannerError",
                          "(line 3, column 14)")
    assert_one_line_error(quantbench("run", "--fewshot-as-multiturn", "--out", str(out)),
                          "--fewshot-as-multiturn needs --apply-chat-template")
    # the tiny tokenizer has no chat template: said before anything runs
    assert_one_line_error(quantbench("run", "--model", str(tiny_model_dir), "--methods", "fp16", "--apply-chat-template",
                                     "--tasks", "lambada_openai", "--out", str(out)),
                          "--apply-chat-template: the tokenizer of", "has no chat template")
    assert not out.exists()
    r = quantbench("run", "--num-fewshot", "two", "--out", str(out))  # argparse's own line, after its usage
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "quantbench run: error: argument --num-fewshot: expected a whole number, got 'two'"
