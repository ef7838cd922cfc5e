"""DDP through the Trainer under torchrun (2 gloo ranks on CPU) for every optimizer name.

Every rank must hold identical parameters and optimizer state (Trainer saves only rank 0's
``optimizer.pt``), and resuming from a checkpoint must continue exactly. With
``optim_args="shard_state=true"`` (ZeRO-1) each rank holds about half the state, and the
parameters equal those of the unsharded run.
"""

import json
import pathlib

import pytest
from _dist_utils import SHAMPOO_ARGS as SHAMPOO
from _dist_utils import TRAINER_OPTIM_ARGS, WORKERS, torchrun, trainer_problems

WORKER = WORKERS / "ddp_trainer_worker.py"

CASES = {
    **{name: (name, args, []) for name, args in TRAINER_OPTIM_ARGS.items()},
    # bf16 parameters with stochastic rounding: the rounding noise is seeded identically per rank
    "microadam-bf16-sr": ("microadam", "window_size=3,density=0.1,stochastic_rounding=true",
                          ["--bf16_params"]),
}

SHARDED_CASES = {
    # (optim, optim_args, tolerance vs the unsharded run)
    "microadam-shard": ("microadam", "window_size=3,density=0.1,shard_state=true", 0.0),
    "shampoo_4bit-shard": ("shampoo_4bit", SHAMPOO + ",shard_state=true", 0.0),
    # EFCP sums its inner products over the partitions: only the fp64 summation order differs
    "efcp_mfac-shard": ("efcp_mfac", "window_size=4,density=0.1,shard_state=true", 1e-6),
}


def run(tmp_path, optim, optim_args, extra, sharded=False):
    out = tmp_path / "result.json"
    torchrun(WORKER, "--optim", optim, "--optim_args", optim_args, "--out_dir", str(tmp_path),
             *extra, log=tmp_path / "stderr.txt", result=out)
    res = json.loads(out.read_text())
    # ranks agree on parameters (and, unsharded, on state); the resume continues exactly
    assert trainer_problems(res, sharded=sharded) == []
    return res


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_trainer_ranks_identical_and_resume_exact(tmp_path, case):
    optim, optim_args, extra = CASES[case]
    run(tmp_path, optim, optim_args, extra)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_ddp_trainer_sharded_state(tmp_path, case):
    optim, optim_args, tol = SHARDED_CASES[case]
    res = run(tmp_path, optim, optim_args, ["--compare_unsharded"], sharded=True)
    assert res["sharded_class"].startswith("ZeroSharded")
    assert res["max_diff_vs_unsharded"] <= tol
    full = res["unsharded_state_bytes_per_rank"]
    per_rank = res["state_bytes_per_rank"]
    assert sum(per_rank) == pytest.approx(full[0], rel=0.02)  # the state is split, not copied
    assert max(per_rank) < 0.6 * full[0]  # and balanced


@pytest.mark.multiprocess
def test_main_job_saves_sharded_state_through_the_trainer(tmp_path):
    """``--save`` under torchrun with ``shard_state=true`` used to die on rank 0 (the recipe
    saved optimizer.pt by hand, without consolidating); the Trainer's final checkpoint holds it."""
    import torch

    recipe = pathlib.Path(__file__).parent.parent / "recipes" / "finetune_llama.py"
    out = tmp_path / "run"
    proc = torchrun(recipe, "--use_cpu", "--optim_args", "window_size=3,shard_state=true",
                    "--save", "--max_steps", "4", "--hidden_size", "32", "--intermediate_size",
                    "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                    "--block_size", "32", "--per_device_train_batch_size", "2",
                    "--max_train_blocks", "64", "--max_eval_blocks", "8", "--warmup_steps", "0",
                    "--output_dir", str(out), log=tmp_path / "stderr.txt")
    assert "share of the ZeRO-1 sharded state" in proc.stdout
    assert "DDP keeps a full copy" not in proc.stdout
    saved = torch.load(out / "checkpoint-4" / "optimizer.pt", map_location="cpu",
                       weights_only=True)
    steps = [int(s["step"]) for s in saved["state"].values()]
    assert steps and set(steps) == {4}  # every parameter's consolidated state, from both ranks
    assert (out / "model.safetensors").is_file()
