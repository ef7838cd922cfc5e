"""Smoke test of recipes/benchmarks/efcp.py at toy sizes (all three sections, JSON, markdown)."""

import json

import torch

from _hf_utils import load_recipe


def test_benchmark_efcp_quick(tmp_path, capsys, one_torch_thread):
    bench = load_recipe("benchmarks.efcp")
    out_json, png = tmp_path / "efcp.json", tmp_path / "efcp.png"
    res = bench.main(["--quick", "--json", str(out_json), "--plot", str(png), "--markdown"])
    text = capsys.readouterr().out
    assert json.loads(out_json.read_text())["memory"]["rows"][0]["label"] == "torch AdamW"
    assert png.stat().st_size > 1000
    rows = {r["label"]: r for r in res["memory"]["rows"]}
    assert 8.0 <= rows["torch AdamW"]["bytes_per_param"] < 8.01  # + the step counters
    dense = rows["dense M-FAC m=16 (density 1, fp32 values)"]
    # dense: 16 fp32 values + 16 int16 indices + fp32 error buffer per element (+ tiny extras)
    assert 16 * 6 + 4 <= dense["bytes_per_param"] < 16 * 6 + 4.1
    assert set(res["convergence"]) == set(bench.CONVERGENCE_RUNS)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in res["convergence"].values())
    assert "eval_vs_dense_pct" in res["convergence"]["S-MFAC 1%"]
    assert res["timing"]["rows"]["torch AdamW (foreach)"]["x_adamw"] == 1.0
    assert "| S-MFAC 1% |" in text and "x smaller than dense M-FAC" in text
    again = bench.main(["--from-json", str(out_json), "--markdown"])
    assert again["memory"] == json.loads(out_json.read_text())["memory"]
