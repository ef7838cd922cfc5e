"""FSDP2 (raw ``fully_shard`` on 2 gloo ranks): DTensor state, DCP checkpoints, shard-consistent
skipping. See ``tests/distributed/fsdp2_worker.py`` for what each figure means."""

import json
import pathlib

import pytest
from _dist_utils import torchrun

WORKER = pathlib.Path(__file__).parent / "distributed" / "fsdp2_worker.py"


def run_worker(tmp_path, optim):
    out = tmp_path / "result.json"
    torchrun(WORKER, "--optim", optim, "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
             log=tmp_path / "stderr.txt")
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("optim", ["microadam", "shampoo_4bit", "shampoo_32bit", "efcp_mfac",
                                   "efcp_ggt"])
def test_fsdp2_state_checkpoint_and_skips(tmp_path, optim):
    res = run_worker(tmp_path, optim)
    assert res["world_size"] == 2  # not a silent single-process launch
    if optim in ("microadam", "efcp_mfac", "efcp_ggt"):
        # no compression: training on shards equals one process (EFCP: its inner products are
        # all-reduced over the shards, so every rank solves the one-process m x m problem)
        assert res["dense_max_diff"] < 1e-5
    # (Shampoo preconditions each rank's row block, so it differs from one process by design)
    # the lr=0, zero-gradient template step of get_optimizer_state_dict changes nothing
    assert res["template_step_changed_params"] is False
    # DCP save / load into a fresh optimizer continues bit for bit, dtypes kept
    assert res["resume_max_diff"] == 0.0
    assert res["dtypes_after_load"] == res["dtypes_before"]
    # the full state dict holds both ranks' rows
    shapes = res["full_state_shapes"]
    gram = shapes.pop("gram", None)  # EFCP's m x m matrix: identical on every rank, replicated
    assert gram in (None, [4, 4])
    assert all(s[0] == 2 for k, s in shapes.items() if s), shapes
    # a NaN in rank 1's shard skips the parameter on both ranks
    assert res["nonfinite_skips_per_rank"] == [1, 1]
    assert res["skipped_param_unchanged_per_rank"] == [1, 1]
    # FSDP2 mixed precision: fp32 sharded master weights, bf16 compute, training progresses
    mp = res["mixed_precision"]
    assert mp["param_dtypes"] == ["torch.float32"]
    assert mp["last"] < mp["first"]
