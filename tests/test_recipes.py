"""Smoke tests of the recipes: the main fine-tuning job and the benchmark, at toy sizes."""

import json
import math

import pytest
import torch

from _hf_utils import RECIPES, load_recipe


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TINY = ["--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1",
        "--num_attention_heads", "2", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--max_train_blocks", "256", "--max_eval_blocks", "16", "--logging_steps", "2",
        "--warmup_steps", "0", "--use_cpu"]


def test_finetune_llama_runs_with_optim_name(tmp_path, capsys):
    finetune = load_recipe("finetune_llama")
    res = finetune.main(TINY + ["--max_steps", "12", "--learning_rate", "3e-2",
                                "--gradient_checkpointing", "--report_to", "none",
                                "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert res["optimizer_class"] == "MicroAdam"  # reached through TrainingArguments(optim=...)
    assert "eval loss before" in out and "eval loss after" in out and "B/param" in out
    assert math.isfinite(res["eval_loss_after"])
    assert res["eval_loss_after"] < res["eval_loss_before"]
    # about 1 byte of state per parameter (small tensors round k up), far below AdamW's 8
    assert 0.5 < res["memory"]["optimizer_state_bytes_per_param"] < 1.5
    saved = json.loads((tmp_path / "finetune_results.json").read_text())
    assert saved["eval_loss_after"] == pytest.approx(res["eval_loss_after"])


def test_finetune_llama_help_shows_this_jobs_defaults(capsys):
    """HfArgumentParser: every TrainingArguments flag, with this job's defaults over its own."""
    finetune = load_recipe("finetune_llama")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--gradient_checkpointing", "--report_to", "--save_steps", "--lora",
                 "--max_train_blocks"):
        assert flag in out
    assert "(default: microadam)" in out and "(default: 0.003)" in out
    args, training_args = finetune.parse_args(["--save"])
    assert args.save and training_args.save_strategy == "steps"
    assert training_args.save_steps == 300 and training_args.report_to == []


def test_finetune_llama_lora_baseline(tmp_path):
    finetune = load_recipe("finetune_llama")
    res = finetune.main(TINY + ["--max_steps", "2", "--lora", "--optim", "adamw_torch",
                                "--output_dir", str(tmp_path)])
    assert res["optimizer_class"] == "AdamW"
    assert res["params_trainable"] < res["params_total"]
    # AdamW: exp_avg + exp_avg_sq in fp32 (+ step counters)
    assert res["memory"]["optimizer_state_bytes_per_param"] == pytest.approx(8.0, abs=0.1)


def test_benchmark_quick(tmp_path, keep_threads):
    bench = load_recipe("benchmarks.microadam")
    out = tmp_path / "bench.json"
    res = bench.main(["--quick", "--no-peers", "--json", str(out)])
    saved = json.loads(out.read_text())
    opts = saved["optimizers"]
    assert {"adamw_foreach", "adamw_fused", "microadam"} <= set(opts)
    assert opts["adamw_foreach"]["bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert 0.9 < opts["microadam"]["bytes_per_param"] < 1.05  # 0.5 + 4/64 + 0.4 + rounding
    assert opts["microadam"]["ratio_to_adamw_foreach"] > 0
    for r in saved["trainer"].values():
        assert r["peak_rss_bytes"] >= r["rss_before_train_bytes"] > 0
    assert "| microadam |" in bench.to_markdown(res)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_finetune_llama_under_torchrun(tmp_path):
    """Two gloo ranks (DDP on CPU): the same script, world size 2, loss still falls."""
    from _dist_utils import torchrun

    torchrun(RECIPES / "finetune_llama.py", *TINY, "--max_steps", "6", "--learning_rate",
             "3e-2", "--output_dir", str(tmp_path), timeout=300,
             result=tmp_path / "finetune_results.json")
    res = json.loads((tmp_path / "finetune_results.json").read_text())
    assert res["world_size"] == 2 and res["optimizer_class"] == "MicroAdam"
    assert res["eval_loss_after"] < res["eval_loss_before"]


def test_finetune_llama_resume_from_checkpoint_is_exact(tmp_path):
    """--save_steps / --resume_from_checkpoint (the flags the multi-GPU recipes use)."""
    finetune = load_recipe("finetune_llama")
    common = TINY + ["--max_steps", "6", "--learning_rate", "3e-2", "--lr_scheduler_type",
                     "constant", "--max_eval_blocks", "4"]
    full = finetune.main(common + ["--save_steps", "3", "--output_dir", str(tmp_path / "a")])
    resumed = finetune.main(common + ["--resume_from_checkpoint",
                                      str(tmp_path / "a" / "checkpoint-3"),
                                      "--output_dir", str(tmp_path / "b")])
    assert resumed["param_fingerprint"] == full["param_fingerprint"]


def test_benchmark_shampoo_quick_convergence(tmp_path, keep_threads):
    """The 4-bit Shampoo deep dive runs end to end (it shares its training step with the
    side-by-side benchmark's convergence phase)."""
    bench = load_recipe("benchmarks.shampoo")
    out = tmp_path / "shampoo.json"
    bench.main(["--part", "convergence", "--quick", "--json", str(out)])
    conv = json.loads(out.read_text())["convergence"]
    assert math.isfinite(conv["rel_gap_4bit_vs_32bit"])
    for run in conv["runs"].values():  # every run learned from its first logged step
        assert run["final_eval"] < run["train"][0]


def test_benchmark_shampoo_quick_cycle_breaks_steps_down_by_kind(tmp_path, keep_threads):
    """The step-cost part times whole T2 cycles and each step by what it does: the plain
    steps, the T1 statistics updates and the T2 root refreshes partition every cycle."""
    bench = load_recipe("benchmarks.shampoo")
    out = tmp_path / "cycle.json"
    bench.main(["--part", "cycle", "--quick", "--json", str(out)])
    cycle = json.loads(out.read_text())["cycle"]
    kinds = cycle["step_kinds"]
    assert {"plain", "stats", "stats+roots"} <= set(kinds)
    assert sum(k["steps_per_cycle"] for k in kinds.values()) == cycle["t2"]
    for row in kinds.values():
        assert all(s > 0 for s in row["median_step_cpu_s"].values())
        assert math.isfinite(row["ratio_4bit_vs_32bit"])
