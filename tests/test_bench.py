"""The benchmark scripts run end to end on tiny shapes (CPU), so they do not rot between GPU sessions.
Their numbers here mean nothing; the H100 figures are in BENCHMARKS.md."""
import re

import pytest
from cli import run_cli


def table_rows(cmd):
    out = run_cli(*cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| -")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # without the header


@pytest.mark.parametrize("cmd, expected", [
    (["bench/bench_generate.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--new-tokens", "48",
      "--contexts", "256", "--context-new-tokens", "40", "--hf-new-tokens", "48", "--prompts", "12", "--slots", "4",
      "--max-answer", "64", "--many-prompt-len", "16"],
     ["ours", "ours", "ours, static batches of 4", "ours, continuous, 4 slots", "transformers dynamic cache"]),
    (["bench/bench_train.py", "--shape", "tiny", "--device", "cpu", "--lengths", "256", "--hf-lengths", "256"],
     ["ours, one document", "ours, five packed docs", "ours, one document, ckpt", "ours, five packed docs, ckpt",
      "transformers"]),
    (["bench/bench_train.py", "--shape", "tiny", "--device", "cpu", "--lengths", "256", "--hf-lengths", "256",
      "--dtype", "bfloat16"],  # both sides under bf16 autocast, as the real-model demo trains on an AMX CPU
     ["ours, one document", "ours, five packed docs", "ours, one document, ckpt", "ours, five packed docs, ckpt",
      "transformers"]),
    (["bench/bench_dpo.py", "--shape", "tiny", "--device", "cpu", "--answer-tokens", "128"],
     ["SFT", "DPO (cached reference)", "SFT, ckpt", "DPO (cached reference), ckpt"]),
])
def test_benchmark_prints_one_row_per_setting_with_a_rate(cmd, expected):
    rows = table_rows(cmd)
    assert [r[0] for r in rows] == expected
    rate_column = 2 if "bench_dpo" not in cmd[0] else 1
    for r in rows:
        assert re.fullmatch(r"[\d,]+(\.\d)?", r[rate_column]) and float(r[rate_column].replace(",", "")) > 0, r


def test_gpu_check_runs_every_item_on_the_cpu_and_ends_with_a_summary(tmp_path):
    out = run_cli("bench/gpu_check.py", "--device", "cpu", "--out", tmp_path / "r.md")
    report = (tmp_path / "r.md").read_text()
    assert report.strip() == out.stdout.strip()
    rows = {cells[0]: cells[1] for cells in table_rows_of(report)}
    assert len(rows) == 12  # 8 correctness items, 4 speed items
    assert rows["packed rows, flash-attn = math backend"] == "SKIP"  # not installed here
    failed = [name for name, status in rows.items() if status == "FAIL"]
    assert not failed and out.returncode == 0, (failed, out.stderr[-3000:])
    assert all(status == "PASS" for name, status in rows.items()
               if name.startswith(("logits", "compiled", "AgentWrite", "SFT:", "DPO:", "packed rows, SDPA")))
    assert all(status == "INFO" for name, status in rows.items() if "shapes" in name)  # no H100 goal judged on a CPU
    assert re.search(r"^summary: 7 passed, 0 failed, 1 skipped$", report, re.M)


def test_gpu_check_only_runs_the_named_items_and_refuses_words_that_name_none(tmp_path):
    run = lambda only: run_cli("bench/gpu_check.py", "--device", "cpu", "--only", only)
    out = run("DPO:,cuDNN")
    assert [cells[0] for cells in table_rows_of(out.stdout)] == ["packed rows, SDPA (cuDNN first) = math backend",
                                                                  "DPO: cached reference = live reference"]
    bad = run("logitz")
    assert bad.returncode == 1 and "--only 'logitz'" in bad.stderr and "logits = transformers, float32" in bad.stderr


def table_rows_of(text):
    lines = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| ---") and not l.startswith("| item")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_stop_odds_kept_under_the_penalty_equal_the_models_own(tmp_path):
    from test_train_dpo import tiny_checkpoint
    ckpt, _ = tiny_checkpoint(tmp_path, sharp=3.0)
    rows = table_rows(["bench/stop_odds.py", "--checkpoint", ckpt, "--data", str(tmp_path / "data" / "train.jsonl"),
                       "--min-words", "20", "--items", "2", "--top-p", "1.0", "--penalty", "1.5",
                       "--dtypes", "float32,bfloat16"])
    assert [r[0] for r in rows] == [f"{ckpt[-27:]}, float32", f"{ckpt[-26:]}, bfloat16"]  # one row per dtype
    (model, ruled, kept), (model_bf16, _, kept_bf16) = (map(float, row[1:4]) for row in rows)
    assert ruled > model + 0.02 > 0.02  # the penalty handed the stop token probability from the words it hit
    assert abs(kept - model) <= 0.01  # keep_stop_odds gives it back: the model's own odds (2 decimals printed)
    assert abs(kept_bf16 - model_bf16) <= 0.01 and abs(model_bf16 - model) <= 0.05  # bf16: the same, rounded
    out = run_cli("bench/stop_odds.py", "--checkpoint", ckpt, "--data", "x.jsonl", "--dtypes", "float16")
    assert out.returncode == 1 and "--dtypes 'float16': float32 and/or bfloat16" in out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--new-tokens", "16"], "--new-tokens 16: more than 17 (the first 16 tokens are not timed)"),
    (["--contexts", "100000"], "100000 tokens (prompt + new tokens, or --contexts) past the tiny shape's context"),
    (["--rounds", "0"], "--rounds 0: at least 1"),
])
def test_bench_generate_refuses_settings_it_would_fail_on_after_measuring(flags, message):
    """An IndexError at the end of the first case, or a traceback after the cases before it had run."""
    out = run_cli("bench/bench_generate.py", "--shape", "tiny", "--device", "cpu", *flags)  # a traceback: raised here
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is here: the default device works")
@pytest.mark.parametrize("script", ["bench/bench_train.py", "bench/bench_dpo.py", "bench/bench_generate.py"])
def test_the_gpu_default_without_cuda_is_one_line_not_an_assertion(script):
    out = run_cli(script, "--shape", "tiny")
    assert out.returncode == 2 and "--device cuda: CUDA is not available here" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_generate_rounds_alternate_the_two_sides_and_show_each_sides_median(monkeypatch, capsys):
    """On a shared CPU one side's figure moves 15% from one minute to the next: in turn, both meet the same."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("bench_generate", "bench/bench_generate.py")
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    calls, ours, hf = [], iter([10.0, 50.0, 30.0]), iter([20.0, 90.0, 40.0])
    monkeypatch.setattr(bg, "ours_rate", lambda *a: calls.append("ours") or next(ours))
    monkeypatch.setattr(bg, "hf_rate", lambda *a, **k: calls.append("hf") or next(hf))
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--shape", "tiny", "--device", "cpu", "--contexts",
                                      "--prompts", "0", "--rounds", "3"])
    bg.main()
    out = capsys.readouterr().out
    assert calls == ["ours", "hf"] * 3 and "median of 3 rounds" in out
    rates = {r.split("|")[1].strip(): float(r.split("|")[3]) for r in out.splitlines() if r.startswith("| ")
             and not r.startswith("| -") and "tokens/s" not in r}
    assert rates == {"ours": 30.0, "transformers dynamic cache": 40.0}
