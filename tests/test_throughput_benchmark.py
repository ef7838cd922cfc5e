"""End-to-end run of recipes/benchmarks/throughput.py on the tiny model: fresh child processes
train through the Trainer, the parent writes the JSON and the table (a few seconds per child)."""

import json

from _hf_utils import RECIPES, load_recipe


def test_throughput_tiny_end_to_end(tmp_path, capsys):
    bench = load_recipe("benchmarks.throughput")
    out = tmp_path / "throughput.json"
    res = bench.main(["--model", "tiny", "--rounds", "1", "--optimizers", "adamw_torch",
                      "microadam", "--steps", "1", "--warmup", "1", "--threads", "1",
                      "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["models"].keys() == {"tiny"} == res["models"].keys()
    tiny = saved["models"]["tiny"]
    for optim in ("adamw_torch", "microadam"):
        (run,) = tiny["runs"][optim]
        assert "error" not in run, run
        assert run["optim"] == optim and run["threads"] == 1 and run["steps"] == 1
        assert len(run["step_seconds"]) == 1 and all(t > 0 for t in run["step_seconds"])
        assert run["samples_per_second"] > 0 and run["peak_rss_bytes"] > 0
        assert run["package"] == str(RECIPES.parent / "hf_compressed_optim")  # this checkout
    assert tiny["runs"]["microadam"][0]["optimizer_class"] == "MicroAdam"
    summary = tiny["summary"]
    assert summary["adamw_torch"]["ratio_to_adamw"] == 1.0
    assert summary["adamw_torch"]["ratio_to_adamw_median"] == 1.0
    assert summary["microadam"]["ratio_to_adamw"] > 0 and summary["microadam"]["ratio_to_adamw_cpu"] > 0
    assert len(tiny["runs"]["microadam"][0]["step_cpu_seconds"]) == 1
    text = capsys.readouterr().out
    assert "| optimizer | samples/s | vs AdamW | samples per CPU-second |" in text
    assert "`microadam`" in text
    again = bench.main(["--from-json", str(out)])
    assert again["models"]["tiny"]["summary"] == summary
