"""The answer under the user's limits, on the result files of a recorded H200 run (tests/fixtures/
standard-h200): each limit moves the pick as it should, an impossible one names the closest method,
and bad limits are refused in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from quantbench import decide, report, rows
from quantbench.results import load_run

GPU_RUN = Path(__file__).resolve().parent / "fixtures" / "standard-h200"
NONE = {"max_weight_mib": None, "min_recovery": None, "max_kld": None, "pick_batch": 1}


def _rows(run_dir=GPU_RUN):
    return rows.rows_of(run_dir.name, run_dir, *load_run(run_dir))


def _pick(limits, run_dir=GPU_RUN):
    d = decide.decision(_rows(run_dir), {**NONE, **limits})
    return d["pick"]["experiment"] if d["pick"] else None


def test_each_limit_moves_the_pick():
    # Memory alone: the lowest KLD that fits (gptq-w4g32 0.197 at 113 MiB; under 110 MiB nf4 0.272 beats fp4 0.487).
    assert _pick({"max_weight_mib": 120}) == "gptq-w4g32"
    assert _pick({"max_weight_mib": 110}) == "nf4"
    # A quality limit: the fastest decode of those that meet it. Recovery >= 95%: fp16 itself is the fastest.
    assert _pick({"min_recovery": 95}) == "fp16"
    assert _pick({"min_recovery": 95, "max_weight_mib": 200}) == "torchao-int8wo"  # 24 tok/s, int8 13, fp8 9
    assert _pick({"min_recovery": 90, "max_weight_mib": 200}) == "nf4"  # 93.6% recovery lets nf4 (35 tok/s) in
    assert _pick({"max_kld": 0.01, "max_weight_mib": 200}) == "torchao-int8wo"
    assert _pick({"max_kld": 0.02, "max_weight_mib": 200}) == "torchao-int8wo"  # int8 (0.017) meets it, slower


def test_the_paragraph_names_the_numbers_the_runner_up_and_what_would_change_it():
    text = decide.pick_paragraph(_rows(), {**NONE, "min_recovery": 95, "max_weight_mib": 200})
    assert text.startswith("**Ship torchao-int8wo** for at most 200 MiB of weights and a mean recovery of at least 95%: "
                           "156 MiB, mean KLD 0.0041, mean recovery 98.5%, 24 tok/s at batch 1. Of the methods that "
                           "meet them it has the fastest decode at batch 1 (speeds within 5% count as equal, then the "
                           "better quality).")
    assert "Runner-up: int8 (156 MiB, mean KLD 0.0172, mean recovery 96.0%, 13 tok/s at batch 1)." in text
    assert "What would change the pick: --max-weight-mib 256.6 would pick fp16 (257 MiB, 49 tok/s at batch 1)" in text
    # Two methods a limit keeps out, each with the value that admits it (a KLD rounded up: 0.27172 -> 0.2718);
    # nf4 before fp4, 1% slower but within the speed tie and of a lower KLD.
    kept = decide.pick_paragraph(_rows(), {**NONE, "max_kld": 0.2, "max_weight_mib": 120})
    assert kept.startswith("**Ship gptq-w4g32**")
    assert ("What would change the pick: --max-weight-mib 256.6 would pick fp16 (257 MiB, 49 tok/s at batch 1); "
            "--max-kld 0.2718 would pick nf4 (107 MiB, mean KLD 0.2717,") in kept
    assert _pick({"max_kld": 0.2718, "max_weight_mib": 120}) == "nf4"
    alone = decide.pick_paragraph(_rows(), {**NONE, "max_kld": 0.01, "max_weight_mib": 200})
    assert "No other method meets them." in alone
    base = decide.pick_paragraph(_rows(), {**NONE, "min_recovery": 95})
    assert "That is the unquantized baseline" in base


def test_the_batch_that_matters_moves_the_pick(tmp_path):
    run = shutil.copytree(GPU_RUN, tmp_path / "run")
    path = run / "torchao-int8wo.json"
    r = json.loads(path.read_text())
    r["cost"]["decode"]["eager"]["32"]["tok_s"] = 2000.0  # faster than nf4's 1088 at batch 32 only
    path.write_text(json.dumps(r))
    limits = {"min_recovery": 90, "max_weight_mib": 200}
    assert _pick(limits, run) == "nf4" and _pick({**limits, "pick_batch": 32}, run) == "torchao-int8wo"
    text = decide.pick_paragraph(_rows(run), {**NONE, **limits})
    assert "at batch 32 (--pick-batch 32) torchao-int8wo is the fastest (2000 tok/s, nf4 1088)" in text


def test_speeds_within_noise_are_equal_and_the_better_quality_wins(tmp_path):
    run = shutil.copytree(GPU_RUN, tmp_path / "run")
    path = run / "int8.json"
    r = json.loads(path.read_text())
    r["cost"]["decode"]["eager"]["1"]["tok_s"] = 24.5  # torchao-int8wo's 24.1 is within 5%, with a lower KLD
    path.write_text(json.dumps(r))
    assert _pick({"min_recovery": 95, "max_weight_mib": 200}, run) == "torchao-int8wo"
    r["cost"]["decode"]["eager"]["1"]["tok_s"] = 30.0  # beyond the tie: int8 is faster
    path.write_text(json.dumps(r))
    assert _pick({"min_recovery": 95, "max_weight_mib": 200}, run) == "int8"


def test_an_impossible_limit_names_the_closest():
    text = decide.pick_paragraph(_rows(), {**NONE, "max_weight_mib": 50})
    assert text == "No method meets at most 50 MiB of weights. The closest is nf4: 107 MiB of weights."
    text = decide.pick_paragraph(_rows(), {**NONE, "max_weight_mib": 120, "min_recovery": 99})
    assert text == ("No method meets at most 120 MiB of weights and a mean recovery of at least 99%. The closest is "
                    "nf4: mean recovery 93.6%, 5.4 points short.")


def test_report_takes_limits_and_the_run_keeps_its_own(tmp_path):
    md, _ = report.build([GPU_RUN], out=tmp_path, limits={"max_weight_mib": 110})
    assert "## Recommendation\n\n**Ship nf4** for at most 110 MiB of weights: 107 MiB, mean KLD 0.2717" in md.read_text()
    assert "Of the methods that meet them it has the lowest mean KLD." in md.read_text()
    cli = [sys.executable, "-m", "quantbench", "report", str(GPU_RUN), "--out", str(tmp_path / "cli")]
    ok = subprocess.run(cli + ["--max-kld", "0.01", "--max-weight-mib", "200"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "**Ship torchao-int8wo**" in (tmp_path / "cli" / "report.md").read_text()


def test_bad_limits_exit_2_naming_the_flag(tmp_path):
    cli = [sys.executable, "-m", "quantbench", "report", str(GPU_RUN), "--out", str(tmp_path)]
    for args, words in [(["--max-kld", "low"], "argument --max-kld: expected a number, got 'low'"),
                        (["--min-recovery", "-5"], "--min-recovery must be a number above 0, got -5.0"),
                        (["--max-weight-mib", "nan"], "--max-weight-mib must be a number above 0, got nan"),
                        (["--pick-batch", "0"], "--pick-batch must be a positive whole number, got 0")]:
        r = subprocess.run(cli + args, capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "quantbench", "run", "--max-weight-mib", "lots"], capture_output=True, text=True)
    assert r.returncode == 2 and "--max-weight-mib: expected a number, got 'lots'" in r.stderr
