"""demo.py: the whole pipeline on a very small setting (the full demo is not a test), its reproducibility,
the bootstrap interval it reports, and the real-model path on a tiny GGUF model written here."""
import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch

from cli import run_cli
from dataset import count_words, loop_start
from evaluate import length_score
from demo import (RealConfig, bootstrap_ci, longest_repeat, parts, real_conclusion, real_dtype, real_results,
                  run_real, run_together, train_instructions)

TINY = ["--steps", "12", "--prompts-per-length", "2", "--eval-lengths", "100,400", "--short-cap", "200",
        "--long-cap", "400", "--pair-instructions", "4", "--pair-samples", "3", "--dpo-steps", "2", "--slots", "4"]


def demo(out, *extra):
    run = run_cli("demo.py", "--out", out, *TINY, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def results_part(stdout):
    """What the demo prints from its results on: the table and the conclusion (no timings, no paths)."""
    return "\n".join(l for l in stdout[stdout.index("| asked (words)"):].splitlines() if not l.startswith("scatter plot:"))


def test_the_demo_leaves_every_artifact_prints_the_same_table_twice_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "one"
    stdout = demo(out)
    for name in ("data/short/train.jsonl", "data/short+long.jsonl", "data/tokenizer/tokenizer.json",
                 "sft-a/latest", "sft-b/latest", "pred-a.jsonl", "pred-b.jsonl", "pairs.jsonl", "lengths.svg",
                 "scores.json"):
        assert (out / name).exists(), name
    scores = json.load(open(out / "scores.json"))
    assert set(scores["models"]) >= {"a", "b"} and "S_l" in scores
    table = results_part(stdout)
    assert "| 100 " in table and "| 400 " in table and "| all " in table and "| <= 400 " in table
    # the closing sentences are derived from the numbers in the table
    words_a = scores["models"]["a"]["> 200"]["words"]
    assert f"{words_a[0]:.1f} [{words_a[1]:.1f}, {words_a[2]:.1f}]" in scores["conclusion"]
    assert scores["conclusion"] in stdout
    # pairs came from instructions whose lengths the evaluation never asks
    pair_lengths = {json.loads(l)["length"] for l in open(out / "pair-instructions.jsonl")}
    assert pair_lengths and not pair_lengths & {100, 400}
    assert results_part(demo(tmp_path / "two")) == table  # every stage seeded, no thread decides anything
    before = (out / "pred-b.jsonl").read_text()
    assert results_part(demo(out)) == table  # finished stages are reused, not redone
    assert (out / "pred-b.jsonl").read_text() == before
    run = run_cli("demo.py", "--out", out, *TINY, "--seed", "1")
    assert run.returncode != 0 and "--seed 0 -> 1" in run.stderr and "--overwrite" in run.stderr
    for flags in ((), ("--overwrite",)):  # a folder of other files (here: runs/) is never written into nor deleted
        run = run_cli("demo.py", "--out", tmp_path, *TINY, *flags)
        assert run.returncode != 0 and "holds files but no demo run" in run.stderr and (out / "demo_config.json").exists()


def test_the_longest_default_ask_fits_the_models_context(tmp_path):
    """The default --eval-lengths end at 3,200 words: 15,104 new tokens, which a context of 4 x 2,048 refused, so
    `python demo.py` (the main job) failed at stage 3 from the day the context was enforced."""
    run = run_cli("demo.py", "--out", tmp_path, "--eval-lengths", "3200", "--prompts-per-length", "1", "--steps", "8",
                  "--pair-instructions", "2", "--pair-samples", "2", "--dpo-steps", "1", "--short-cap", "200",
                  "--long-cap", "400", "--slots", "4")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.load(open(tmp_path / "model_config.json"))["max_position_embeddings"] >= 15104 + 15
    # no request up to --long-cap: no DPO gain to give, not a NaN (which strict JSON readers refuse)
    assert "NaN" not in (tmp_path / "scores.json").read_text()


def test_the_bootstrap_interval_covers_a_known_case():
    # 200 zeros and 200 hundreds: mean 50, standard error 50 / sqrt(400) = 2.5, so 95% is about 50 +- 4.9
    mean, low, high = bootstrap_ci([0] * 200 + [100] * 200)
    assert mean == 50 and low == pytest.approx(50 - 1.96 * 2.5, abs=0.6) and high == pytest.approx(50 + 1.96 * 2.5, abs=0.6)
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0, 7.0)  # no spread, no width
    assert bootstrap_ci(np.arange(10)) == bootstrap_ci(np.arange(10))  # seeded


# -----------------------------------------------------------------------------
# the real-model path (demo.py --real), on a tiny GGUF model and a scripted writer

class Writer:
    """Writes each AgentWrite section as the words it asks for, in sentences that do not repeat."""

    def __init__(self):
        self.calls = 0

    def complete(self, messages, max_tokens, temperature=0.7):
        n = int(re.findall(r"in about (\d+) words", messages[-1]["content"])[-1])  # the section's, not the request's
        self.calls += 1
        return " ".join(f"The sea rose {self.calls} times and {k} boats came in." for k in range(n // 10)), "stop"

    def chat(self, messages, max_tokens, temperature=0.7):
        return self.complete(messages, max_tokens, temperature)[0]


@pytest.fixture
def two_threads():
    """torch on 2 threads (a 1-core CI machine too): the real demo then answers beside AgentWrite (side_process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def tiny_real(tmp_path) -> RealConfig:
    pytest.importorskip("gguf", reason="the gguf package (test-only) writes the tiny GGUF file")
    from test_gguf import write_gguf
    write_gguf(tmp_path / "tiny.gguf", quantized=True, context=2048)
    return RealConfig(out=str(tmp_path / "real"), gguf=str(tmp_path / "tiny.gguf"), eval_min=2800, eval_max=3000,
                      limit_factor=0.02, train_items=3, train_lengths="60,90", section_words=30, sft_epochs=2,
                      freeze_layers=1, max_tokens=1024, slots=4, samples=2)


def test_the_real_model_demo_runs_every_stage_on_a_tiny_gguf_model_and_reuses_them(tmp_path, capsys, two_threads):
    cfg = tiny_real(tmp_path)
    writer = Writer()
    run_real(cfg, writer=writer)
    stdout = capsys.readouterr().out
    assert "(limit: 0.02x the asked words), in a process of its own on 1 of 2 threads, beside 3-5." in stdout
    assert torch.get_num_threads() == 2  # given back after the two stages
    out = tmp_path / "real"
    for name in ("base/config.json", "base/chat_template.jinja", "pred-base.jsonl", "instructions.jsonl",
                 "agentwrite.jsonl", "sft/finished", "pred-sft.jsonl", "lengths.svg", "scores.json"):
        assert (out / name).exists(), name
    preds = sorted((json.loads(l) for l in open(out / "pred-base.jsonl")), key=lambda p: p["index"])  # file: as they end
    assert len(preds) == 8 and {p["length"] for p in preds} == {2800, 3000}  # LongBench-Write's 4 English rows
    assert [(p["index"], p["sample"]) for p in preds] == [(i, i % 2) for i in range(8)]
    assert all(preds[i]["prompt"] == preds[i + 1]["prompt"] for i in (0, 2, 4, 6))  # 2 answers per request, in turn
    assert all(p["generation"]["max_new_tokens"] == int(0.02 * 1.35 * p["length"]) for p in preds)
    assert all(p["generation"]["dtype"] == real_dtype(cfg) for p in preds)  # another dtype: answered again
    records = [json.loads(l) for l in open(out / "agentwrite.jsonl")]
    assert len(records) == 3 and writer.calls == 2 + 3 + 2  # 60 words: 2 sections, 90: 3, 60: 2
    assert sorted(re.findall(r"^(## Part \d+ of \d+): \w", r["messages"][1]["content"], re.M) for r in records) == [
        ["## Part 1 of 2", "## Part 2 of 2"]] * 2 + [["## Part 1 of 3", "## Part 2 of 3", "## Part 3 of 3"]]  # --headings
    assert all(r["writer"]["heading_points"] is True for r in records)  # each heading names its section's point
    assert all(r["writer"]["top_p"] == cfg.top_p for r in records)  # sampled as the answers are
    assert all(r["writer"]["cut_loops"] is True for r in records)  # no section that loops is kept whole
    scores = json.load(open(out / "scores.json"))
    assert set(scores["models"]) == {"base", "sft"} and scores["conclusion"] in stdout
    assert scores["models"]["base"]["all"]["n"] == 4 and scores["models"]["base"]["all"]["answers"] == 8
    assert "paired over the same requests" in scores["conclusion"] and len(scores["S_l_gain"]) == 3
    preds = {m: [json.loads(l) for l in open(out / f"pred-{m}.jsonl")] for m in ("base", "sft")}
    assert scores["word_loops"] == {m: sum(longest_repeat(x["response"], "word") >= 4 for x in p) for m, p in preds.items()}
    assert f"four or more times in a row: {scores['word_loops']['base']} (base)" in scores["conclusion"]
    free = scores["loop_free"]["models"]  # the same table with each answer's words counted up to where it loops
    assert [free[m]["all"]["loops"] for m in preds] == [sum(loop_start(x["response"]) < count_words(x["response"])
                                                           for x in p) for p in preds.values()]
    assert free["base"]["all"]["words"][0] <= scores["models"]["base"]["all"]["words"][0]
    assert "loop-free words: mean, median (base)" in stdout and "S_l gain on the loop-free words, paired: " in stdout
    assert f"Counted only up to where an answer starts to loop ({free['base']['all']['loops']} base" in scores["conclusion"]
    assert scores["run_together"] == {m: sum(run_together(x["response"]) > 0 for x in p) for m, p in preds.items()}
    glued = scores["run_together"]
    assert f"without a space): {glued['base']} (base), {glued['sft']} (sft);" in scores["conclusion"]
    assert scores["part_headings"] == {m: sum(parts(x["response"])[0] > 0 for x in p) for m, p in preds.items()}
    assert scores["past_last_part"] == {m: sum(parts(x["response"])[1] for x in p) for m, p in preds.items()}
    headed, past = scores["part_headings"], scores["past_last_part"]
    assert (f"headings: {headed['base']} (base), {headed['sft']} (sft), of which {past['base']} and {past['sft']} go on "
            "past their own last part.") in scores["conclusion"]
    assert "| all " in stdout and "(base) on " in stdout and "(sft) on " in stdout
    assert re.search(r"\(sft\) on .*, words before it starts to loop \d+\n", stdout)
    assert "base: tiny; sft: the same" in stdout and "tiny before and after SFT" in (out / "lengths.svg").read_text()
    run_real(cfg, writer=writer)  # finished stages are reused: no section is written again
    assert writer.calls == 7 and capsys.readouterr().out.count("| all ") == 2  # both tables
    # other settings with --overwrite start afresh, the model converted again (it was "checkpoint folder does not
    # exist": the folder was deleted after the converted model had been found there)
    run_real(dataclasses.replace(cfg, sft_epochs=1, overwrite=True), writer=writer)
    assert writer.calls == 14 and capsys.readouterr().out.count("| all ") == 2  # both tables


def test_bad_input_for_the_answers_beside_agentwrite_ends_the_demo_before_agentwrite_writes(tmp_path, capfd,
                                                                                             two_threads):
    """The base model's answers run in a process of their own beside AgentWrite; when they are refused (here the
    file holds an answer made with other settings) the demo ends at once, not after AgentWrite's minutes."""
    cfg = tiny_real(tmp_path)
    out = tmp_path / "real"
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite"}))
    other = {"index": 0, "prompt": "Write 3000 words.", "length": 3000, "response": "x", "generation": {"model": "other"}}
    (out / "pred-base.jsonl").write_text(json.dumps(other) + "\n")
    writer = Writer()
    with pytest.raises(SystemExit, match=r"^error: the process beside this one \(answer_beside\) ended with exit code 1"):
        run_real(cfg, writer=writer)
    assert writer.calls == 0 and "pred-base.jsonl: row 0 was made by other settings" in capfd.readouterr().err
    assert torch.get_num_threads() == 2


def wait_for_sigusr1(path, checked):
    """A process beside (side_process's target): tells whether SIGUSR1 came within a minute of its start."""
    import signal
    import time
    threads, came = torch.get_num_threads(), []
    signal.signal(signal.SIGUSR1, lambda *_: came.append(True))
    checked.set()
    end = time.time() + 60
    while not came and time.time() < end:
        time.sleep(0.05)
    open(path, "w").write(f"{threads} threads, " + ("signalled" if came else "never signalled"))


def test_the_process_beside_is_told_when_the_stage_beside_it_ends_and_then_decodes_on_every_thread(tmp_path):
    """A lone long answer at the end of the base model's answers ran on 1 of 2 threads for ~10 minutes after
    AgentWrite had ended: the process beside now gets SIGUSR1 and takes every thread."""
    import signal

    import demo
    with demo.side_process(wait_for_sigusr1, (str(tmp_path / "said"),), 1):
        pass
    assert (tmp_path / "said").read_text() == "1 threads, signalled"
    seen, before = [], torch.get_num_threads()

    def target(checked):  # what the process beside runs: here it signals itself, then looks
        checked.set()
        seen.append(torch.get_num_threads())
        signal.raise_signal(signal.SIGUSR1)
        seen.append(torch.get_num_threads())
    handler = signal.getsignal(signal.SIGUSR1)
    try:
        torch.set_num_threads(2)
        import threading
        ready = threading.Event()
        demo.run_beside(target, (), 1, ready)  # in this process: no parent to end with
        assert ready.is_set() and seen == [1, 2]
        # then ignored: the block's end may signal a process that is exiting, where the default action ended it (-10)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, handler)
        torch.set_num_threads(before)


def end_soon(checked):
    """A process beside that ends two seconds after its input has passed (the block here has begun by then)."""
    import time
    checked.set()
    time.sleep(2)


def test_this_process_takes_every_thread_once_the_process_beside_has_ended(two_threads):
    """The base model's answers, beside AgentWrite, SFT and the fine-tuned model's answers, may end first: the stages
    here then go on on every thread (it was 1 of 2 until the end of the block, an SFT stage's minutes among them)."""
    import time

    import demo
    with demo.side_process(end_soon, (), 1):
        seen, end = [torch.get_num_threads()], time.time() + 30
        while torch.get_num_threads() < 2 and time.time() < end:
            time.sleep(0.05)  # SIGCHLD's handler runs here, in the main thread
        seen.append(torch.get_num_threads())
    assert seen == [1, 2] and torch.get_num_threads() == 2


def answer_after_sft(ckpt, rows, out_path, cfg, checked):
    """demo.answer_beside that first waits (30 s at most) for the fine-tuned model's answers, and says whether they came."""
    import os
    import time

    import demo
    checked.set()
    end, sft = time.time() + 30, os.path.join(cfg.out, "pred-sft.jsonl")
    while not os.path.exists(sft) and time.time() < end:
        time.sleep(0.1)
    open(os.path.join(cfg.out, "seen"), "w").write("sft answers first" if os.path.exists(sft) else "no sft answers")
    demo.answer_beside(ckpt, rows, out_path, cfg, checked)


def test_the_base_models_answers_run_beside_agentwrite_sft_and_the_fine_tuned_answers(tmp_path, capsys, monkeypatch,
                                                                                      two_threads):
    """Stage 2 in its process ran beside AgentWrite only: SFT waited for its last long answers (~5 minutes on both
    threads in the fifteenth real run), though neither SFT nor stage 5 needs them."""
    import demo
    monkeypatch.setattr(demo, "answer_beside", answer_after_sft)
    cfg = tiny_real(tmp_path)
    run_real(cfg, writer=Writer())
    assert (tmp_path / "real" / "seen").read_text() == "sft answers first"
    stdout = capsys.readouterr().out
    assert stdout.index("5. the fine-tuned model answers") < stdout.index("waiting for stage 2") < stdout.index("| all ")
    preds = [json.loads(l) for l in open(tmp_path / "real" / "pred-base.jsonl")]
    assert len(preds) == 8 and torch.get_num_threads() == 2


def sleep_beside(path, checked):
    """A process beside that writes its pid and would sleep for a minute."""
    import os
    import time
    open(path, "w").write(str(os.getpid()))
    checked.set()
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_process_beside_ends_when_the_demo_is_killed_outright(tmp_path):
    """Killed outright, the demo never joins the process beside it, which went on writing pred-base.jsonl (and beside a
    rerun's own process, into the same file)."""
    import os
    import subprocess
    import time
    code = ("import os, signal, demo, test_demo\n"
            f"with demo.side_process(test_demo.sleep_beside, ({str(tmp_path / 'pid')!r},), 1):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    with open(tmp_path / "err", "w") as err:  # not a pipe: the process beside holds its copy open while it lives
        done = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=120)
    assert done.returncode == -9, (tmp_path / "err").read_text()
    pid, end = int((tmp_path / "pid").read_text()), time.time() + 20

    def running():
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    while running() and time.time() < end:
        time.sleep(0.1)
    assert not running()


def test_each_request_counts_once_as_the_mean_of_its_samples_and_the_gain_is_paired():
    def answers(words):  # two requests asking 1,000 and 2,000 words, two answers each
        return [{"length": n, "response": "", "response_length": w, "finish_reason": "stop", "source": "Ruler"}
                for n, w in zip((1000, 1000, 2000, 2000), words)]
    rows = [{"length": 1000, "source": "Ruler"}, {"length": 2000, "source": "Ruler"}]
    preds = {"base": answers([1000, 250, 2000, 2000]), "sft": answers([1000, 1000, 2000, 2000])}
    results, gain = real_results(rows, preds, 2, 1000, 2000)
    base = results["base"]["all"]
    # S_l: 100 and 0 (a quarter of the asked words) average to 50 for the first request; the second scores 100
    assert base["n"] == 2 and base["answers"] == 4 and base["S_l"][0] == pytest.approx(75.0)
    assert base["words"][0] == pytest.approx((625 + 2000) / 2) and base["median"] == 1500
    assert results["base"]["1000"]["S_l"][0] == pytest.approx(50.0) and results["sft"]["all"]["S_l"][0] == 100
    assert gain[0] == pytest.approx(25.0) and gain[1] >= 0 and gain[2] <= 50  # per request: +50 and 0
    text = real_conclusion(results, gain, 3, 1000, 2000)
    assert text.startswith("Asked for 2 pieces of 1,000-2,000 words (2 answers each), the base model ended 4 of its 4")
    assert "paired over the same requests the gain is 25.0 [" in text
    with pytest.raises(SystemExit, match="--samples 0: each request needs at least 1 answer"):
        run_real(RealConfig(samples=0, out="/nonexistent/never-made"))  # refused before anything is written
    for flags, message in ((dict(slots=0), "--slots 0: at least 1 row"), (dict(sft_epochs=0), "--sft-epochs 0"),
                           (dict(limit_factor=0.0), "--limit-factor 0: a positive multiple"),
                           (dict(section_words=0), "--section-words 0"),
                           (dict(heading_points=True, headings=False), "--heading-points .* needs --headings")):
        # each failed later, at its stage (the last once stage 2 had begun beside AgentWrite)
        with pytest.raises(SystemExit, match=message):
            run_real(RealConfig(out="/nonexistent/never-made", **flags))


def test_bad_input_found_inside_a_stage_ends_the_demo_with_one_error_line(monkeypatch):
    import demo

    def refuse(cfg):
        raise ValueError("a KV cache of 64 rows x 8192 tokens needs 22.5 GiB, more than the 20.1 GiB available")
    monkeypatch.setattr(demo, "run_real", refuse)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--real", "--slots", "64"])
    with pytest.raises(SystemExit, match=r"^error: a KV cache of 64 rows"):
        demo.main()


def test_a_run_made_before_a_setting_existed_resumes_and_other_settings_are_refused(tmp_path):
    """A run folder of an older demo has no --heading-points in its demo_config.json: it was made without them, and a
    rerun with --no-heading-points resumes it (it was refused as "other settings", None -> False); the default now
    puts them in, so a default rerun is refused rather than mixing two kinds of training answers."""
    from demo import prepare_out
    cfg = RealConfig(out=str(tmp_path / "run"), heading_points=False)
    prepare_out(cfg)
    path = tmp_path / "run" / "demo_config.json"
    saved = json.loads(path.read_text())
    del saved["heading_points"]
    path.write_text(json.dumps(saved))
    prepare_out(cfg)  # resumed
    assert json.loads(path.read_text())["heading_points"] is False
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"other settings \(--heading-points False -> True\)"):
        prepare_out(dataclasses.replace(cfg, heading_points=True))
    assert RealConfig.heading_points is True
    del saved["cut_loops"]  # added later with a default of True: such folders were made without it
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"other settings \(--cut-loops False -> True\)"):
        prepare_out(cfg)
    prepare_out(dataclasses.replace(cfg, cut_loops=False))  # --no-cut-loops resumes it
    assert json.loads(path.read_text())["cut_loops"] is False


def test_the_real_demo_checks_its_inputs_before_writing_anything(tmp_path):
    out = tmp_path / "out"  # a first run with a wrong path left a demo_config.json that then refused the right one
    with pytest.raises(FileNotFoundError, match="missing.gguf: GGUF file not found"):
        run_real(RealConfig(gguf=str(tmp_path / "missing.gguf"), out=str(out)))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="longbench_write_en.jsonl: the benchmark prompts are not there"):
        run_real(RealConfig(gguf=str(tmp_path / "m.gguf"), bench_dir=str(tmp_path / "nowhere"), out=str(out)))
    (tmp_path / "bench").mkdir()
    for name in ("longbench_write_en.jsonl", "longwrite_ruler.jsonl"):
        (tmp_path / "bench" / name).write_text(json.dumps({"prompt": "Write 2000 words.", "length": 2000}) + "\n")
    for flags, error in (({"eval_min": 3000, "eval_max": 1500}, "no English request asks 3000-1500 words"),
                         ({"train_lengths": "2000,abc"}, "--train-lengths '2000,abc' --train-items 24: numbers of words"),
                         ({"train_items": 1}, "at least 2 instructions")):  # found after the base answers, an hour in
        with pytest.raises(ValueError, match=error):
            run_real(RealConfig(gguf=str(tmp_path / "m.gguf"), bench_dir=str(tmp_path / "bench"), out=str(out), **flags))
    assert not out.exists()


def test_the_real_demo_refuses_more_frozen_blocks_than_the_model_has_before_writing(tmp_path):
    """SFT refused it after the base model's answers (an hour); checked at the end of stage 1 instead, the
    run's demo_config.json then refused the corrected flag."""
    pytest.importorskip("gguf", reason="the gguf package (test-only) writes the tiny GGUF file")
    from test_gguf import write_gguf
    write_gguf(tmp_path / "tiny.gguf", quantized=False)  # 2 blocks
    with pytest.raises(ValueError, match="--freeze-layers 3: the model has 2 blocks"):
        run_real(RealConfig(gguf=str(tmp_path / "tiny.gguf"), out=str(tmp_path / "out"), freeze_layers=3))
    assert not (tmp_path / "out").exists()


def test_the_toy_demo_refuses_flags_it_cannot_run_before_writing_anything(tmp_path):
    from demo import DemoConfig, run_toy
    for flags, error in (({"eval_lengths": "100,abc"}, "--eval-lengths '100,abc': numbers of words"),
                         ({"short_cap": 400, "long_cap": 200}, "100 <= short cap <= long cap - 100"),  # an IndexError
                         ({"long_cap": 300, "short_cap": 150}, "DPO's instructions ask 300, 500"),
                         ({"steps": 0}, "--steps 0 --scale 1: each at least 1")):  # "0 packed rows"
        with pytest.raises(ValueError, match=re.escape(error)):
            run_toy(DemoConfig(out=str(tmp_path / "out"), **flags))
    assert not (tmp_path / "out").exists()


# Real text of SmolLM2-135M-Instruct (demo --real, 2026-12-06): the start of an AgentWrite answer, sections written one
# call each (no loop), and the start of the fine-tuned model's answer to a 2,400-word request, whose parts restate
# the first one with other words: a loop neither repeat check sees and the no-repeat rule lets through.
CLEAN = ('Part 1 of 3\n\nThe story of electric cars is a tale of innovation and perseverance. As we look back '
    'on their past, the advent of electric vehicles has transformed the way humanity interacts with '
    'technology. The development of these vehicles not only altered our transportation options but also '
    'sparked discussions around sustainability and environmental responsibility.\n\nTo this day, many '
    'people still refer to electric cars as "electric" because they don\'t have wheels. However, when we '
    'think about them in a broader context, it is clear that their impact extends far beyond just the '
    'technology behind them. They are an important part of the movement towards zero-emission vehicles '
    'and a reminder of what can be achieved when humanity works together towards a common goal.\n\nIn '
    "today's world, electric cars have become increasingly popular due to various reasons such as energy "
    'security, environmental awareness, and affordability. But even with these advantages come '
    'challenges and concerns. Many people are still skeptical about the feasibility of electric cars in '
    "terms of their performance but also believe that they can be a game-changer for our planet's "
    'future.\n\nIn this essay, we will explore various aspects such as how electric vehicles have been '
    'made more efficient, their role in reducing emissions, and their impact on environmental '
    'sustainability. We will examine the role of electric cars in the context of human ingenuity, their '
    'potential to reduce carbon footprint while also promoting eco-friendly practices within '
    'society.\n\nThe essay will conclude with a thought-provoking reflection that goes beyond just '
    'discussing technology itself but also explores the intersection between technology and ethics.')
LOOPING = ('## Part 1 of 6\n### Part 1 of 6\nThe Telecom Operator Service App (TOSA) is a global network managed '
    'by the Global Telecommunications Network (GMT). It operates in 35 countries across Asia, Africa, '
    'Europe and North America. The TOSA has been established as an Internet service provider for over a '
    'decade now with multiple partners including Global Telecommunication Corporation (Global Telecom), '
    'World Telecommunications Organization (WTO), and several other international telecom providers such '
    'as ITU-T, ISD, and ITU.\n\n### Part 2 of 6\nThe Telecom Operator App is an internet service provider '
    'that provides free internet connectivity to its users worldwide through satellite internet devices '
    'like the Internet Explorer 17 (IEJ), which are also referred to as internet telecommunication '
    'services (ITCS). The TOSA has a global network managed by the Global Telecommunications Corporation '
    '(GMT) and operates in 35 countries across Asia, Europe, North America, Africa, Latin America, and '
    'the Caribbean.\n\n### Part 3 of 6\nThe Telecom Operator System App is an internet service provider '
    'that provides free access to its users worldwide through satellite internet devices like Internet '
    'Explorer 17 (IEJ), but it also offers a premium service for users who require enhanced security '
    'features such as encryption and firewalls. The TOSA has a global network managed with the Global '
    'Telecommunications Corporation (GMT) which includes various other international telecom providers '
    'such as Telefonica, Telecom Australia, and Telefonica Asia.\n\n### Part 4 of 6\nThe Telecom Operator '
    'Operation System (TOPS) is an internet service provider that provides a variety of services to its '
    'users worldwide through satellite internet devices like Satellite Internet Service Provider (SIP), '
    'which includes internet telecommunication services for users across the world. The TOPS has '
    'different types such as Satellite Internet Service Provider (SIP), which also offers various other '
    'internet services including mobile internet connectivity and cable internet connectivity.\n\n### Part '
    '5 of 6\nThe Telecom Operator Management System is an online service provider that provides access to '
    "its customers' data through a network called the Global Telecommunications Network (GMT). The TOSA "
    'has different types such as Satellite Internet Service Provider, which also offers various other '
    'internet services including mobile phone internet connectivity and cable internet connectivity.\n\n## '
    'Part 6 of 6\nThe Telecom Operator Mobile System (Tosmo) is a global network managed by the Global '
    'Mobile Telecommunications Providers Association (GMT). It operates in 30 countries across Asia, '
    'Europe, North America, Latin America, Africa, and Australia. The TOSM has different types such as '
    'Satellite Internet Service Provider and Internet Relay Chat (Ierm), which also provides various '
    'other internet services including mobile')


def test_loop_start_finds_where_an_answer_starts_to_restate_itself():
    assert loop_start(CLEAN) == count_words(CLEAN) == 268  # no loop: every word counts
    assert 100 <= loop_start(LOOPING) <= 200 < count_words(LOOPING) == 400  # from Part 2 on it says Part 1 again
    assert longest_repeat(LOOPING) == 1 and longest_repeat(LOOPING, "word") <= 2  # unseen by the other checks
    assert loop_start(CLEAN + "\n\n" + LOOPING) == 268 + loop_start(LOOPING)  # a loop that starts later
    assert loop_start("") == 0 and loop_start("Too short to hold a stretch of 200 words.") == 8  # as count_words
    rows = [{"length": 1000, "source": "Ruler"}]
    preds = {m: [{"length": 1000, "response": text, "response_length": count_words(text), "finish_reason": "stop"}]
             for m, text in (("base", CLEAN), ("sft", LOOPING))}
    plain, _ = real_results(rows, preds, 1, 1000, 1000)
    free, gain = real_results(rows, preds, 1, 1000, 1000, loop_free=True)
    assert plain["sft"]["all"]["words"][0] == 400 and free["sft"]["all"]["words"][0] == loop_start(LOOPING)
    assert free["base"]["all"]["words"][0] == 268 and (plain["base"]["all"]["loops"], free["sft"]["all"]["loops"]) == (0, 1)
    assert gain[0] == length_score(1000, loop_start(LOOPING)) - length_score(1000, 268)


def test_the_training_instructions_are_our_own_and_the_repeat_check_counts_runs():
    rows = train_instructions(RealConfig(train_items=12))
    assert len({r["prompt"] for r in rows}) == 12 and sum(bool(re.search(r"\bstory\b", r["prompt"])) for r in rows) == 4
    assert all(str(r["length"]) in r["prompt"] for r in rows)
    assert longest_repeat("One. Two. Two. Two. One.") == 3 and longest_repeat("A b. C d. A b.") == 1
    loop = "It was remarkable remarkable Remarkable remarkable, truly. It was remarkable."
    assert longest_repeat(loop) == 1 and longest_repeat(loop, "word") == 4  # a loop no sentence check sees
    drift = "So many places.\n492 The Best ThingsYouCanDoInChinaAllYear, basedoncarbonmittedfromcoalburning now."
    assert run_together(drift) == 2 and longest_repeat(drift) == longest_repeat(drift, "word") == 1  # seen by neither
    assert run_together("Internationalization and counterrevolutionaries, https://www.example.com/longpath.") == 0
    assert run_together("长城是中国古代的军事防御工程，绵延数千公里，历经多个朝代修建而成。") == 0  # letters only, not CJK
    # the fine-tuned model's own headings, as it wrote them: in order, then on past the last part, and mid-line
    assert parts("## Part 1 of 3\nOne.\n## Part 3 of 3\nThree.") == (2, False)
    assert parts("## Part 9 of 9\nNine.\n\n                            #109 \n## Part 30 of 9\nIn the world") == (2, True)
    assert parts("a 3,000-word request answered under Part 1 of 2, then Part 12 of 12.") == (2, False)
    assert parts("Part of the plan: 10 of 12 parts. Counterpart 5 of 2.") == (0, False)  # no heading, no false hit


def test_the_real_demo_computes_in_bfloat16_on_cuda_and_on_cpus_with_bf16_instructions(monkeypatch):
    assert real_dtype(RealConfig(device="cuda")) == "bfloat16" and real_dtype(RealConfig(dtype="float32")) == "float32"
    for avx512_bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert real_dtype(RealConfig()) == expected
    with pytest.raises(ValueError, match="--dtype 'half': choose one of float32, bfloat16, float16"):
        real_dtype(RealConfig(dtype="half"))
