"""Tests of ablation.py: the real programs on a tiny budget (T = 10), and its bookkeeping with stand-ins."""
import json
import os

import pytest

import ablation
from conftest import run_program

QUICK = ["--steps", "3", "--T", "10", "--n-test", "8", "--n-samples", "10", "--device", "cpu", "--amp", "off",
         "--out", "a"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the programs run as child processes


def run(*argv):
    return run_program(ablation.main, argv)


@pytest.mark.slow
def test_two_rows_end_to_end_then_nothing_is_retrained(monkeypatch, capsys):
    assert run(*QUICK, "--rows", "eps-simple,mean-vlb-learned") == 0
    table = open("a/table.md").read()
    assert "| ε prediction | ‖ε − ε_θ‖² (L_simple) |" in table and "| μ̃ prediction | L, learned diagonal Σ |" in table
    assert "9.46±0.11 | 3.17 | ≤ 3.75 |" in table and os.path.getsize("a/samples.png") > 1000
    record = json.load(open("a/eps-simple-s0/ablation.json"))
    assert record["status"] == "ok" and record["step"] == 3 and record["bound_bpd"] > 0
    assert json.load(open("a/mean-vlb-learned-s0/results.json"))["sigma"] == "learned"
    monkeypatch.setattr(ablation, "call", None)  # a second run reads every finished row back
    assert run(*QUICK, "--rows", "eps-simple,mean-vlb-learned") == 0
    assert open("a/table.md").read() == table


def fake_programs(diverge=(), interrupt=()):
    """A stand-in for ablation.call: train.py 'diverges' or is 'interrupted' on the named rows; evaluate.py
    writes a results.json; sample.py writes nothing (the picture leaves that row blank)."""
    calls = []

    def call(program, *argv):
        calls.append(program)
        where = argv[argv.index("--out") + 1] if "--out" in argv else argv[1]
        row = os.path.basename(where).rsplit("-s", 1)[0]
        if program == "train.py" and row in diverge:
            return 3, "error: the loss became nan at step 2; stopped without saving.", 0
        if program == "train.py" and row in interrupt:
            return 130, "", 2  # SIGINT
        if program == "evaluate.py":
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, "results.json"), "w") as f:
                json.dump(dict(step=3, bound=dict(total_bpd=3.5, total_bpd_se=0.1), quality=dict(
                    frechet_distance=4.0, floor_train_vs_test=2.0, confident=0.8, confident_test=0.9)), f)
        return 0, "", 0
    return call, calls


def test_an_unstable_row_is_recorded_and_the_table_goes_on(monkeypatch, capsys):
    call, calls = fake_programs(diverge=("mean-mse",))
    monkeypatch.setattr(ablation, "call", call)
    assert run(*QUICK, "--seeds", "0,1") == 0
    table = open("a/table.md").read()
    assert "| μ̃ prediction | ‖μ̃ − μ̃_θ‖² | unstable | unstable | unstable | 2 of 2 |" in table
    assert "| ε prediction | ‖ε − ε_θ‖² (L_simple) | 3.500 (3.500-3.500) | 4.00 (4.00-4.00) | 80% (80%-80%) | 0 of 2" \
        in table
    assert calls.count("train.py") == 14 and calls.count("evaluate.py") == 12
    assert json.load(open("a/mean-mse-s1/ablation.json"))["why"].startswith("error: the loss became nan")


def test_ctrl_c_keeps_finished_rows_and_the_same_command_continues(monkeypatch, capsys):
    call, calls = fake_programs(interrupt=("eps-vlb-learned",))
    monkeypatch.setattr(ablation, "call", call)
    assert run(*QUICK) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    assert sorted(os.listdir("a")) == [f"{r}-s0" for r in ("mean-mse", "mean-vlb-fixed", "mean-vlb-learned")]
    call, calls = fake_programs()
    monkeypatch.setattr(ablation, "call", call)
    assert run(*QUICK) == 0
    assert calls.count("train.py") == 4  # only the rows not finished before


def test_rows_run_with_another_budget_are_refused(monkeypatch, capsys):
    call, _ = fake_programs()
    monkeypatch.setattr(ablation, "call", call)
    assert run(*QUICK, "--rows", "eps-simple") == 0
    assert run(*QUICK, "--rows", "eps-simple", "--n-samples", "20") == 2
    assert "a/eps-simple-s0 was run with" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rows", "eps-simple,nope"], "unknown row 'nope'"),
    (["--seeds", "0,0"], "must be distinct seeds"),
    (["--steps", "0"], "must be positive"),
    (["--n-samples", "1"], "at least 2"),
    (["--out", "a-file/x"], "cannot write to a-file/x"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(ablation, "call", None)
    open("a-file", "w").close()
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
