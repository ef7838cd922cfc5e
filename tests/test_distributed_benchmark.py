"""Smoke test of recipes/benchmarks/distributed.py on 2 gloo ranks (tiny model): per-rank state
bytes of the sharded modes are about half of DDP's, and the markdown table renders."""

import json
import pathlib
import subprocess
import sys

import pytest
from _dist_utils import torchrun

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE = "recipes.benchmarks.distributed"


@pytest.mark.multiprocess
def test_state_bytes_per_rank_halve_when_sharded(tmp_path):
    out = tmp_path / "dist.json"
    torchrun("-m", MODULE, "--hidden", "64", "--layers", "1", "--steps", "2", "--optimizers",
             "adamw", "microadam", "--json", str(out), log=tmp_path / "stderr.txt", cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    by = {(r["optimizer"], r["mode"]): r for r in rows}
    for name in ("adamw", "microadam"):
        ddp = by[(name, "ddp")]["max_state_bytes_per_rank"]
        assert by[(name, "ddp")]["world_size"] == 2
        for mode in ("ddp_sharded", "fsdp2"):
            assert by[(name, mode)]["max_state_bytes_per_rank"] < 0.6 * ddp, (name, mode)
    assert by[("adamw", "ddp")]["bytes_per_param_per_rank"] == pytest.approx(8.0, abs=0.05)
    table = subprocess.run([sys.executable, "-m", MODULE, "--markdown", str(out)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "| microadam | fsdp2 | 2 |" in table
