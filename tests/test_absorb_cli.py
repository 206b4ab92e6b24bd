"""`absorber absorb` (the PyTorch reference CLI) on the tiny model: JSON rounds, answers, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

ARGS = ["--model", "tiny", "--n", "64", "--m", "32", "--k", "2", "--rank", "2"]


def absorb(*extra, stdin=None):
    return subprocess.run([sys.executable, "-m", "absorber", "absorb", *ARGS, *extra], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_absorb_json_rounds_summary_and_answer(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(("The quick brown fox jumps over the lazy dog. " * 8 + "\n").encode() * 3 + b"bad \xff byte\n")
    r = absorb("--input", str(f), "--json", "--ask", "What jumps?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    rounds, summary = rows[:-1], rows[-1]["summary"]
    assert rounds and all(set(x) == {"round", "tokens_absorbed", "loss_first", "loss_last", "steps", "seconds"}
                          for x in rounds)
    assert [x["round"] for x in rounds] == list(range(1, len(rounds) + 1))
    assert summary["tokens_absorbed"] == 64 * len(rounds) and summary["window"] < 64 + 32
    assert summary["answers"][0]["question"] == "What jumps?"


def test_absorb_reads_stdin_and_refuses_empty_input():
    r = absorb("--input", "-", stdin="")
    assert r.returncode == 2 and "empty input" in r.stderr and "Traceback" not in r.stderr
    r = absorb("--input", "/nonexistent/file.txt")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_absorb_bos_flag_sets_the_config():
    import argparse

    from absorber.commands import absorb as A
    p = argparse.ArgumentParser()
    A.add_arguments(p)
    assert A.config_from_args(p.parse_args(["--input", "-", "--bos"])).bos is True
    assert A.config_from_args(p.parse_args(["--input", "-"])).bos is False
