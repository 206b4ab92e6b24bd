"""`absorber bench` in smoke mode: a tiny bundle and a tiny model produce the table, the JSON and the plot."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_smoke_produces_table_json_and_plot(tiny_bundle, tmp_path):
    out, png, md = tmp_path / "bench.json", tmp_path / "rss.png", tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--bundle", str(tiny_bundle), "--model", "tiny",
                        "--tokens", "200", "--n", "64", "--m", "32", "--k", "2", "--rss-tokens", "300",
                        "--json", str(out), "--md", str(md), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    engines = {e["engine"]: e for e in res["engines"]}
    assert set(engines) == {"torch", "runtime"}
    for e in engines.values():
        assert e["rounds"] >= 1 and e["absorbed_tok_s"] > 0 and e["peak_rss_mb"] > 0
        assert e["decode_tok_s"] > 0 and e["ttft_s"] > 0
    assert res["runtime_vs_torch_speedup"] > 0 and 0 < res["gemm_peak_fraction"] < 1.5
    assert res["gemm"]["peak_gflops"] > 0
    curves = {c["engine"]: c for c in res["rss_curves"]}
    assert curves["runtime"]["curve"][-1][0] == 300
    assert "| runtime |" in md.read_text() and png.stat().st_size > 1000


def test_bench_rejects_a_folder_that_is_not_a_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--bundle", str(tmp_path), "--no-torch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a bundle" in r.stderr and "Traceback" not in r.stderr
