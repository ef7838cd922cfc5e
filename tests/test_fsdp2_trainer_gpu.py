"""accelerate FSDP2 through the Trainer (GPU only: accelerate runs FSDP only on accelerators).

One GPU already exercises the DTensor parameter swap, the sharded (DCP) optimizer checkpoint and
its template step. For each optimizer: a 6-step run saving at step 3, then a run resumed from
checkpoint-3 must end with the same parameters.
"""

import json
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--hidden_size", "64", "--intermediate_size", "128", "--num_hidden_layers", "2",
        "--num_attention_heads", "2", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--max_train_blocks", "128", "--max_eval_blocks", "8", "--warmup_steps", "0",
        "--max_steps", "6", "--lr_scheduler_type", "constant", "--logging_steps", "1"]
OPTIM_ARGS = {
    "microadam": "window_size=3,density=0.1",
    "shampoo_4bit": "T1=1,T2=2,min_quant_size=0",
    "efcp_mfac": "window_size=4,density=0.1",
}


def launch(out_dir, optim, *extra):
    launcher = shutil.which("accelerate")
    n = torch.cuda.device_count()
    cmd = [launcher, "launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"),
           "--num_processes", str(n), "--main_process_port", "0",
           str(ROOT / "recipes/finetune_llama.py"), *TINY, "--optim", optim, "--optim_args",
           OPTIM_ARGS[optim], "--output_dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out_dir / "finetune_results.json").read_text())


@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.parametrize("optim", sorted(OPTIM_ARGS))
def test_accelerate_fsdp2_trainer_checkpoint_resume(tmp_path, optim):
    full = launch(tmp_path / "full", optim, "--save_steps", "3")
    assert full["optimizer_class"] != "AdamW"
    resumed = launch(tmp_path / "resumed", optim, "--resume_from_checkpoint",
                     str(tmp_path / "full" / "checkpoint-3"))
    assert resumed["param_fingerprint"] == pytest.approx(full["param_fingerprint"], rel=1e-6)
