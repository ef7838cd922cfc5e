"""The side-by-side benchmark (recipes/benchmarks): a --quick run end to end, and the report's rules.

The quick run checks that every phase produces sane numbers and that the report, the plots and the
BENCHMARKS.md splice are written; it times nothing (the figures of a quick run mean nothing).
"""

import json
import math

import pytest

from _hf_utils import RECIPES, load_recipe


@pytest.fixture(scope="module")
def bench_modules():
    return {name: load_recipe(f"benchmarks.{name}") for name in ("run", "report")}


@pytest.fixture(scope="module")
def quick_run(bench_modules, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    bench_modules["run"].main(["all", "--quick", "--no-peers", "--no-progress", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_quick_report_files(quick_run):
    out, res = quick_run
    text = (out / "report.md").read_text()
    for heading in ("### Memory claims", "### Optimizer-state bytes per parameter",
                    "### Peak training memory", "### Optimizer step time",
                    "### Convergence: text", "### Convergence: finetune",
                    "### Convergence: digits"):
        assert heading in text
    for png in ("memory.png", "step_time.png", "convergence_text.png",
                "convergence_finetune.png", "convergence_digits.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert res["meta"]["mode"] == "quick" and res["meta"]["versions"]["torch"]


def test_quick_memory_is_sane(quick_run, bench_modules):
    _, res = quick_run
    mem = res["memory"]
    rows = mem["sizes"][mem["largest"]]["optimizers"]
    assert rows["adamw_torch"]["bytes_per_param"] == pytest.approx(8.0, abs=0.02)
    assert rows["adamw_torch_fused"]["bytes_per_param"] == pytest.approx(8.0, abs=0.02)
    assert 0.8 < rows["microadam"]["bytes_per_param"] < 1.0
    assert mem["efcp_window"]["ratio"] >= 95
    assert mem["shampoo_preconditioner"]["ratio"] >= 6
    assert rows["shampoo_4bit"]["bytes_per_param"] < rows["shampoo_32bit"]["bytes_per_param"]
    for name in ("microadam", "efcp_mfac", "efcp_ggt", "shampoo_4bit", "shampoo_32bit"):
        assert rows[name]["unaccounted_bytes_per_param"] <= 0.04, name  # 1% of fp32 params
    for name, r in mem["peak"]["optimizers"].items():
        assert "error" not in r, (name, r)
        assert r["peak_bytes"] >= r["before_bytes"] > 0
    assert [ok for _, ok, _ in bench_modules["report"].acceptance(res)] == [True, True, True]


def test_quick_speed_and_convergence_are_sane(quick_run):
    _, res = quick_run
    for size in res["speed"]["sizes"].values():
        assert size["optimizers"]["adamw_torch"]["ratio_to_adamw"] == 1.0
        for name, r in size["optimizers"].items():
            assert "error" not in r, (name, r)
            assert 0 < r["ratio_to_adamw"] < 1000 and r["median_s"] > 0
    for task, c in res["convergence"].items():
        assert "adamw_torch_fused" not in c["optimizers"]  # same math as adamw_torch
        for name, r in c["optimizers"].items():
            assert "error" not in r, (task, name, r)
            assert r["best_lr"] in [s["lr"] for s in r["sweep"]]
            assert len(r["runs"]) == c["seeds"]
            for run in r["runs"]:
                assert not run["diverged"]
                assert math.isfinite(run["test"]["loss"])
                assert run["curve"][-1][1] < run["curve"][0][1], (task, name)  # it learned
    assert set(res["convergence"]) == {"text", "finetune", "digits"}
    ft = res["convergence"]["finetune"]
    # fine-tuning starts from the pretrained base, not from a random model (loss ~ ln 256 = 5.5)
    assert ft["optimizers"]["adamw_torch"]["runs"][0]["curve"][0][1] < \
        res["convergence"]["text"]["optimizers"]["adamw_torch"]["runs"][0]["curve"][0][1] - 0.2
    acc = res["convergence"]["digits"]["optimizers"]["adamw_torch"]["test_accuracy"]["mean"]
    assert 0.3 < acc <= 1.0  # ten classes: chance is 0.1


def test_report_is_a_function_of_results(quick_run, bench_modules, tmp_path):
    """`run.py report` re-renders the same Markdown without measuring; the BENCHMARKS splice is
    idempotent and keeps the text around it."""
    out, _ = quick_run
    run = bench_modules["run"]
    before = (out / "report.md").read_text()
    target = tmp_path / "BENCH.md"
    target.write_text("# Title\n\nintro\n")
    run.main(["report", "--quick", "--out", str(out), "--update-benchmarks", str(target)])
    assert (out / "report.md").read_text() == before
    once = target.read_text()
    run.main(["report", "--quick", "--out", str(out), "--update-benchmarks", str(target)])
    twice = target.read_text()
    assert once == twice and once.startswith("# Title\n\nintro\n")
    assert once.count(run.MARK_BEGIN) == 1 and "### Convergence: text" in once


def _conv(values_a, values_b):
    def summ(v):
        m = sum(v) / len(v)
        return dict(mean=m, std=(sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5, values=v)
    return {"x": {"test_loss": summ(values_a)}, "adamw_torch": {"test_loss": summ(values_b)}}


def test_noise_rule(bench_modules):
    report = bench_modules["report"]
    clear = report.diff_vs(_conv([2.10, 2.11, 2.12], [2.00, 2.01, 2.02]), "x")
    assert clear["significant"] and clear["rel"] == pytest.approx(0.05, abs=1e-3)
    noisy = report.diff_vs(_conv([2.0, 2.3, 1.9], [2.05, 2.1, 2.0]), "x")
    assert not noisy["significant"]


def test_acceptance_flags_a_miss(bench_modules):
    report = bench_modules["report"]
    res = {"memory": {"largest": "s", "sizes": {"s": {"params": 1000, "optimizers": {
        "microadam": {"bytes_per_param": 1.2}}}},
        "shampoo_preconditioner": dict(bits4_bytes_per_param=4.0, bits32_bytes_per_param=20.0,
                                       ratio=5.0)}}
    assert [ok for _, ok, _ in report.acceptance(res)] == [False, False]


def test_subset_rerun_keeps_the_other_optimizers(quick_run, bench_modules, tmp_path):
    """``--optimizers`` (with a roster variant) replaces only the named optimizers' figures."""
    out, res = quick_run
    (tmp_path / "results.json").write_text(json.dumps(res))
    bench_modules["run"].main(["convergence", "--quick", "--no-peers", "--no-progress", "--tasks",
                               "digits", "--optimizers", "microadam_alpha0.25", "--out",
                               str(tmp_path)])
    new = json.loads((tmp_path / "results.json").read_text())
    old_opts = res["convergence"]["digits"]["optimizers"]
    new_opts = new["convergence"]["digits"]["optimizers"]
    assert set(new_opts) == set(old_opts) | {"microadam_alpha0.25"}
    assert new_opts["adamw_torch"] == old_opts["adamw_torch"]
    assert new["convergence"]["text"] == res["convergence"]["text"]
    assert new["memory"] == res["memory"] and "microadam_alpha0.25" in new["roster"]
    assert "microadam_alpha0.25" in (tmp_path / "report.md").read_text()


def test_step_ab_child_times_one_checkout():
    step_ab = load_recipe("benchmarks.step_ab")
    ms = step_ab.run(str(RECIPES.parent), "adamw")
    assert 0 < ms < 60_000


def test_step_ab_ratios_against_adamw_with_kernel_breakdown():
    step_ab = load_recipe("benchmarks.step_ab")
    res = step_ab.run_ratios(str(RECIPES.parent), ["adamw", "microadam"], rounds=1, block=1)
    assert set(res) == {"adamw", "microadam"}
    assert all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 for r in res.values())
    # the kernels MicroAdam calls are timed (the native loops on CPU where they are built, else
    # the twins); AdamW calls none of them
    from hf_compressed_optim.kernels import _native
    want = ({"error_feedback_compress_native", "window_adam_update_native"}
            if _native.library() is not None else {"block_topk", "window_adam_update", "quantize4"})
    assert want <= set(res["microadam"]["ops_cpu_ms"])
    assert res["adamw"]["ops_cpu_ms"] == {}
