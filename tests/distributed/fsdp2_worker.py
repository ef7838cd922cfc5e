"""FSDP2 worker (run with torchrun, 2 gloo ranks on CPU): reproduces accelerate's flow.

The optimizer is built on plain parameters, the model is then wrapped with ``fully_shard`` and the
optimizer's parameters are swapped for the DTensor shards (as accelerate's
``fsdp2_switch_optimizer_parameters`` does). Checks, written to ``--out`` as JSON by rank 0:

* training on shards equals one process at density 1 (no compression, so blocking cannot matter);
* a DCP save / load into a fresh optimizer (whose template step runs with lr=0 and zero grads)
  continues bit-for-bit;
* state dtypes survive ``set_optimizer_state_dict``; the full state dict gathers every rank;
* a parameter whose local shard is empty on one rank works.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _worker_common import finish, start_watchdog  # noqa: E402
import hf_compressed_optim as hco


def build_model():
    torch.manual_seed(0)
    # the (1, 16) layer has an empty local shard on rank 1
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1))


def make_optimizer(name, params, density):
    if name == "microadam":
        return hco.MicroAdam(params, lr=1e-2, window_size=3, density=density,
                             quant_block_size=8, topk_block_size=64, weight_decay=0.1)
    if name in ("shampoo_4bit", "shampoo_32bit"):
        # tiny factors: quantize all of them (min_quant_size=0), refresh often; the 4-bit run
        # grafts onto AdamW with 4-bit moments on every shard (lowbit_min_size=0), the 32-bit
        # run onto fp32 AdamW
        four = name == "shampoo_4bit"
        return hco.Shampoo(params, lr=1e-2, weight_decay=0.1, precond_bits=4 if four else 32,
                           first_order="adamw_4bit" if four else "adamw", lowbit_min_size=0,
                           stat_update_interval=1, root_update_interval=2, min_quant_size=0,
                           quant_block_size=8, max_order=12)
    if name == "efcp_mfac":
        # at density 1 exact storage (no rounding into the error buffer, whose 4-bit buckets
        # would follow the shards); compressed runs use the 4-bit error buffer
        exact = density == 1.0
        return hco.SparseMFAC(params, lr=1e-2, window_size=4, density=density, weight_decay=0.1,
                              topk_block_size=64, quant_block_size=8,
                              ef_bits=32 if exact else 4, value_dtype="fp32" if exact else "bf16")
    if name == "efcp_ggt":
        return hco.SparseGGT(params, lr=1e-2, window_size=4, density=density, weight_decay=0.1,
                             topk_block_size=64, ef_bits=32)  # fp32 buffer: exact at density 1
    if name == "adamw":  # the control: torch's own optimizer on the same path
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    raise ValueError(name)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def train(model, opt, xs):
    for x in xs:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def full_params(model):
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def shard(model, mesh, mp_policy=None):
    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def swap_optimizer_params(opt, old_params, new_params):
    mapping = {id(o): n for o, n in zip(old_params, new_params)}
    for group in opt.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]


def sharded_run(name, density, xs, mesh):
    model = build_model()
    plain = list(model.parameters())
    opt = make_optimizer(name, model.parameters(), density)
    shard(model, mesh)
    swap_optimizer_params(opt, plain, list(model.parameters()))
    train(model, opt, xs)
    return model, opt


def _gather(t):
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out).tolist()


def skip_check(model, opt, x, rank, world, res):
    """A NaN in the last rank's shard of the first parameter: every rank skips it."""
    import warnings

    first = next(iter(model.parameters()))
    before = first.to_local().clone()
    model(x).pow(2).mean().backward()
    if rank == world - 1:
        first.grad.to_local().view(-1)[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    opt.zero_grad()
    skips = torch.tensor([opt.nonfinite_skips])
    unchanged = torch.tensor([int(torch.equal(first.to_local(), before))])
    res["nonfinite_skips_per_rank"] = [int(v) for v in _gather(skips)]
    res["skipped_param_unchanged_per_rank"] = [int(v) for v in _gather(unchanged)]


def main():
    start_watchdog()
    ap = argparse.ArgumentParser()
    ap.add_argument("--optim", default="microadam")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    res = {"world_size": world}
    xs = batches(6)

    # 1. density 1: sharded training equals one process
    ref = build_model()
    ref_opt = make_optimizer(args.optim, ref.parameters(), 1.0)
    train(ref, ref_opt, xs)
    model, opt = sharded_run(args.optim, 1.0, xs, mesh)
    res["dense_max_diff"] = max(float((a - b).abs().max()) for a, b in
                                zip(full_params(model), ref.parameters()))

    # 2. compressed run, DCP round trip, exact continuation
    model, opt = sharded_run(args.optim, 0.25, xs[:3], mesh)
    sd = get_optimizer_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=args.ckpt)
    dtypes_before = {k: str(v.dtype) for k, v in opt.state[next(iter(model.parameters()))].items()
                     if torch.is_tensor(v)}
    train(model, opt, xs[3:])
    expected = full_params(model)

    model2 = build_model()
    plain2 = list(model2.parameters())
    opt2 = make_optimizer(args.optim, model2.parameters(), 0.25)
    shard(model2, mesh)
    swap_optimizer_params(opt2, plain2, list(model2.parameters()))
    # parameters as they were at the checkpoint
    model_ckpt, _ = sharded_run(args.optim, 0.25, xs[:3], mesh)
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model_ckpt.parameters()):
            p.to_local().copy_(q.to_local())
    template = get_optimizer_state_dict(model2, opt2)  # runs the lr=0, zero-grad template step
    res["template_step_changed_params"] = any(
        bool((p.to_local() != q.to_local()).any())
        for p, q in zip(model2.parameters(), model_ckpt.parameters()))
    dcp.load(template, checkpoint_id=args.ckpt)
    set_optimizer_state_dict(model2, opt2, template)
    res["dtypes_after_load"] = {k: str(v.dtype) for k, v in
                                opt2.state[next(iter(model2.parameters()))].items()
                                if torch.is_tensor(v)}
    res["dtypes_before"] = dtypes_before
    train(model2, opt2, xs[3:])
    got = full_params(model2)
    res["resume_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, expected))

    # 3. the full state dict holds every rank's state
    full = get_optimizer_state_dict(model2, opt2, options=StateDictOptions(full_state_dict=True))
    first = next(iter(full["state"].values()))
    res["full_state_shapes"] = {k: list(v.shape) for k, v in first.items() if torch.is_tensor(v)}
    res["local_shapes"] = [list(p.to_local().shape) for p in model2.parameters()]

    # 4. a non-finite entry in one rank's shard skips that parameter on every rank (this
    # package's policy; torch's AdamW has none)
    if isinstance(opt2, hco.CompressedOptimizer):
        skip_check(model2, opt2, xs[0], rank, world, res)

    # 5. FSDP2 mixed precision (accelerate's policy): fp32 sharded masters, bf16 compute
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    model3 = build_model()
    plain3 = list(model3.parameters())
    opt3 = make_optimizer(args.optim, model3.parameters(), 0.25)
    shard(model3, mesh, policy)
    swap_optimizer_params(opt3, plain3, list(model3.parameters()))
    losses = []
    for x in batches(12, seed=3):
        loss = model3(x).pow(2).mean()
        loss.backward()
        opt3.step()
        opt3.zero_grad()
        losses.append(float(loss))
    res["mixed_precision"] = {"first": losses[0], "last": losses[-1],
                              "param_dtypes": sorted({str(p.dtype) for p in model3.parameters()})}
    finish(res, args.out)


if __name__ == "__main__":
    main()
