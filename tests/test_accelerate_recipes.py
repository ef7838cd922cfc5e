"""The accelerate configs users copy (``recipes/accelerate/*.yaml``) parse, and the DDP one drives
the main job on 2 CPU ranks (FSDP needs accelerators: accelerate falls back to DDP on CPU)."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"


@pytest.mark.parametrize("name,dist_type", [("single", "NO"), ("ddp", "MULTI_GPU"),
                                            ("fsdp2", "FSDP")])
def test_accelerate_config_parses(name, dist_type):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(dist_type)
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.multiprocess
def test_ddp_config_launches_main_job_on_two_cpu_ranks(tmp_path):
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate CLI not on PATH")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = [launcher, "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--mixed_precision",
           "no", "--main_process_port", "0", str(ROOT / "recipes" / "finetune_llama.py"),
           "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1",
           "--num_attention_heads", "2", "--block_size", "32", "--per_device_train_batch_size",
           "4", "--max_train_blocks", "128", "--max_eval_blocks", "8", "--warmup_steps", "0",
           "--use_cpu", "--max_steps", "3", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "finetune_results.json").read_text())
    assert res["world_size"] == 2 and res["optimizer_class"] == "MicroAdam"
