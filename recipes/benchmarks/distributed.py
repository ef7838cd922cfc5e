"""Optimizer-state bytes per rank under DDP, DDP with ZeRO-1 state sharding, and FSDP2.

Run it with 1 and with 2 processes (CPU: gloo; GPUs: nccl); each run appends its rows to the
``--json`` file, ``--markdown`` prints the table from that file::

    torchrun --nproc_per_node 1 -m recipes.benchmarks.distributed --json recipes/results/dist.json
    torchrun --nproc_per_node 2 -m recipes.benchmarks.distributed --json recipes/results/dist.json
    python -m recipes.benchmarks.distributed --markdown recipes/results/dist.json

For each optimizer and mode a small LLaMA (real layer structure: attention, MLP, embeddings,
norms) takes a few steps on random tokens; the state bytes each rank holds are then measured with
:func:`hf_compressed_optim.optimizer_state_bytes` (packed DTensor state counts its local row) and
gathered. EFCP optimizers also report the bytes their cross-rank all-reduces add per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import hf_compressed_optim as hco
from hf_compressed_optim.engines.zero import ZeroShardedOptimizer

from .common import add_options, build_llama, md_table

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-3),
    "shampoo_4bit": lambda ps: hco.Shampoo(ps, lr=1e-3, stat_update_interval=1,
                                           root_update_interval=2),
    "shampoo_32bit": lambda ps: hco.Shampoo(ps, lr=1e-3, precond_bits=32,
                                            stat_update_interval=1, root_update_interval=2),
    "efcp_mfac": lambda ps: hco.SparseMFAC(ps, lr=1e-3, window_size=64, ef_bits=32),
    "efcp_ggt": lambda ps: hco.SparseGGT(ps, lr=1e-3, window_size=64, ef_bits=32),
}

MODES = ("ddp", "ddp_sharded", "fsdp2")


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    """LLaMA (seed 0) with a 1024-token vocabulary, MLP 8/3 hidden, one head per 64 dims."""
    heads = max(2, hidden // 64)
    return build_llama((hidden, layers, hidden * 8 // 3 // 16 * 16, heads, heads), 0,
                       vocab=1024, max_positions=128)


class AllReduceCounter:
    """Counts the bytes passed to ``dist.all_reduce`` while active (EFCP's m-vectors)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def run_one(name: str, mode: str, args, device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(args.hidden, args.layers).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    world = dist.get_world_size()
    if mode == "fsdp2":
        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        opt = OPTIMIZERS[name](model.parameters())
    else:
        wrapped = DDP(model) if world > 1 else model
        if mode == "ddp_sharded" and world > 1:
            factory = OPTIMIZERS[name]
            opt = ZeroShardedOptimizer(
                list(model.parameters()), optimizer_class=_OptimizerFromFactory(factory))
        else:
            opt = OPTIMIZERS[name](model.parameters())
    g = torch.Generator().manual_seed(dist.get_rank())
    comm = AllReduceCounter()
    times = []
    for step in range(args.steps):
        ids = torch.randint(0, 1024, (args.batch, args.seq), generator=g).to(device)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        t0 = time.perf_counter()
        if step == args.steps - 1:
            with comm:
                opt.step()
        else:
            opt.step()
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    state = hco.optimizer_state_bytes(opt)["total"]
    gathered = [None] * world
    dist.all_gather_object(gathered, state)
    return {"optimizer": name, "mode": mode, "world_size": world, "params": n_params,
            "state_bytes_per_rank": gathered,
            "max_state_bytes_per_rank": max(gathered),
            "bytes_per_param_per_rank": max(gathered) / n_params,
            "allreduce_bytes_per_step_in_optimizer": comm.bytes,
            "allreduce_calls_per_step_in_optimizer": comm.calls}


class _OptimizerFromFactory:
    """``ZeroRedundancyOptimizer`` wants a class called as ``cls(params, **defaults)``."""

    def __init__(self, factory):
        self.factory = factory
        self.__name__ = "factory"

    def __call__(self, params, **_):
        return self.factory(params)


def to_markdown(rows: list[dict]) -> str:
    """The table of the rows of one or more runs (1 and 2 ranks)."""
    base = {(r["mode"], r["world_size"]): r["max_state_bytes_per_rank"] for r in rows
            if r["optimizer"] == "adamw"}
    ordered = sorted(rows, key=lambda r: (list(OPTIMIZERS).index(r["optimizer"]),
                                          MODES.index(r["mode"]), r["world_size"]))
    return "\n".join(md_table(
        ["optimizer", "mode", "ranks", "state bytes per rank (max)", "B/param per rank",
         "vs AdamW same mode", "optimizer all-reduce bytes/step"], "llrrrrr",
        [[r["optimizer"], r["mode"], r["world_size"], f"{r['max_state_bytes_per_rank']:,}",
          f"{r['bytes_per_param_per_rank']:.3f}",
          f"{r['max_state_bytes_per_rank'] / b:.3f}" if (b := base.get(
              (r["mode"], r["world_size"]))) else "-",
          f"{r['allreduce_bytes_per_step_in_optimizer']:,}"] for r in ordered]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap, {"--hidden": 256, "--layers": 2, "--steps": 3, "--batch": 2, "--seq": 32})
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--json", default=None, help="append rows to this JSON file (rank 0)")
    ap.add_argument("--markdown", default=None, help="print the table of a JSON file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(to_markdown(json.load(f)["rows"]))
        return None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    rows = []
    for name in args.optimizers:
        for mode in args.modes:
            rows.append(run_one(name, mode, args, device))
            if dist.get_rank() == 0:
                r = rows[-1]
                print(f"{name:14s} {mode:12s} ranks={r['world_size']} "
                      f"state/rank={r['max_state_bytes_per_rank']:,} B "
                      f"({r['bytes_per_param_per_rank']:.3f} B/param)", flush=True)
    if dist.get_rank() == 0 and args.json:
        data = {"rows": []}
        if os.path.exists(args.json):
            with open(args.json) as f:
                data = json.load(f)
        keep = [r for r in data["rows"] if r["world_size"] != dist.get_world_size()]
        data = {"device": "cuda" if cuda else "cpu", "torch": torch.__version__,
                "hidden": args.hidden, "layers": args.layers, "rows": keep + rows}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    dist.barrier()
    # gloo's worker threads outlive this while anything still references the group (the
    # FSDP2 meshes, DDP); the package's exit hook waits until they are idle (issue #18)
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not False else 1)
