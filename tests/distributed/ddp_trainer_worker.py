"""DDP worker for the Trainer (run with torchrun, 2 gloo ranks, ``use_cpu=True``).

Trains a tiny LLaMA with ``optim=<name>`` for 6 steps saving a checkpoint at step 3, then a second
Trainer resumes from it and trains to step 6. Rank 0 writes JSON with:

* ``world_size`` and the distributed type (guards against silent single-process launches);
* whether parameters and optimizer state are identical on every rank (only rank 0's
  ``optimizer.pt`` is saved, so they must be);
* the largest parameter difference between the resumed and the uninterrupted run.
"""

import argparse
import hashlib
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import hf_compressed_optim  # noqa: E402,F401  (registers the optim names)
from _hf_utils import lm_dataset, tiny_llama, training_args  # noqa: E402
from _worker_common import finish, start_watchdog  # noqa: E402
from hf_compressed_optim.core.memory import (  # noqa: E402
    optimizer_state_bytes, state_holder, unwrap_optimizer,
)
from hf_compressed_optim.engines.zero import find_zero_optimizer  # noqa: E402


def _gather_ints(value: int) -> list[int]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(value))
    return out


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_tensors(opt):
    opt = state_holder(opt)
    out = []
    for p in (p for g in opt.param_groups for p in g["params"]):
        for key in sorted(opt.state.get(p, {})):
            v = opt.state[p][key]
            if torch.is_tensor(v):
                out.append(v)
    return out


def main():
    start_watchdog()
    ap = argparse.ArgumentParser()
    ap.add_argument("--optim", required=True)
    ap.add_argument("--optim_args", default=None)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--compare_unsharded", action="store_true",
                    help="also train without shard_state and compare parameters and bytes")
    ap.add_argument("--bf16_params", action="store_true",
                    help="pure bf16 parameters (transformers' default LLaMA load dtype)")
    args = ap.parse_args()
    from transformers import Trainer

    torch.set_num_threads(1)
    data = lm_dataset(n=96)
    common = dict(optim=args.optim, optim_args=args.optim_args, learning_rate=args.lr,
                  max_steps=6, per_device_train_batch_size=4, weight_decay=0.01,
                  ddp_backend="gloo")
    def model(seed=0):
        m = tiny_llama(seed=seed)
        return m.to(torch.bfloat16) if args.bf16_params else m

    full = Trainer(model=model(), train_dataset=data,
                   args=training_args(os.path.join(args.out_dir, "full"), save_strategy="steps",
                                      save_steps=3, **common))
    full.train()
    res = {"world_size": dist.get_world_size(),
           "distributed_type": str(full.accelerator.distributed_type),
           "optimizer_class": type(unwrap_optimizer(full.optimizer)).__name__}
    params = list(full.model.parameters())
    mine = [digest(params), digest(state_tensors(full.optimizer))]  # ZeRO: the local part
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    res["params_identical_across_ranks"] = len({g[0] for g in gathered}) == 1
    res["state_identical_across_ranks"] = len({g[1] for g in gathered}) == 1

    resumed = Trainer(model=model(seed=1), train_dataset=data,
                      args=training_args(os.path.join(args.out_dir, "resumed"), **common))
    resumed.train(resume_from_checkpoint=os.path.join(args.out_dir, "full", "checkpoint-3"))
    res["resume_max_diff"] = max(float((a.detach() - b.detach()).abs().max())
                                 for a, b in zip(resumed.model.parameters(), params))
    res["resumed_global_step"] = resumed.state.global_step
    res["state_bytes_per_rank"] = _gather_ints(optimizer_state_bytes(full.optimizer)["total"])
    if args.compare_unsharded:
        from hf_compressed_optim.integrations.transformers import pop_shard_state

        plain_args, _ = pop_shard_state(args.optim_args)
        plain_args = ",".join(f"{k}={v}" for k, v in plain_args.items()) or None
        plain = Trainer(model=model(), train_dataset=data,
                        args=training_args(os.path.join(args.out_dir, "plain"),
                                           **{**common, "optim_args": plain_args}))
        plain.train()
        res["max_diff_vs_unsharded"] = max(float((a.detach() - b.detach()).abs().max())
                                           for a, b in zip(plain.model.parameters(), params))
        res["unsharded_state_bytes_per_rank"] = _gather_ints(
            optimizer_state_bytes(plain.optimizer)["total"])
        res["sharded_class"] = type(find_zero_optimizer(full.optimizer)).__name__
    finish(res, os.path.join(args.out_dir, "result.json"))


if __name__ == "__main__":
    main()
