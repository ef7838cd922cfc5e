"""Gradient release (``gradient_release=True``): the step inside backward, its exactness against
the ordinary step, its refusals, and the stock Trainer around it."""

from __future__ import annotations

import gc
import io
import types
import warnings
import weakref

import pytest
import torch
from transformers import Trainer, get_linear_schedule_with_warmup

import hf_compressed_optim as hco
from hf_compressed_optim.integrations.release import check_trainer_args

from _hf_utils import inner_optimizer, lm_dataset, losses, tiny_llama, train_and_resume, training_args

OPTIMIZERS = {
    "microadam": (hco.MicroAdam, dict(density=0.1, weight_decay=0.01)),
    "shampoo": (hco.Shampoo, dict(stat_update_interval=2, root_update_interval=3)),
    "efcp_mfac": (hco.SparseMFAC, dict(window_size=3, momentum=0.5)),
    "efcp_ggt": (hco.SparseGGT, dict(window_size=3, weight_decay=0.01, wd_mode="l2")),
}


def _model(dtype=torch.float32, seed=0):
    """Odd sizes, and a layer that gets a gradient every other step (EFCP's idle slices)."""
    torch.manual_seed(seed)
    return _Net().to(dtype)


class _Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Linear(37, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48),
                         torch.nn.Tanh(), torch.nn.Linear(48, 5), torch.nn.Linear(3, 3))

    @property
    def unused(self):
        return self[5]

    def forward(self, x):
        for i in range(5):
            x = self[i](x)
        return x


def _train(opt, model, steps, seed=1, start=0, scheduler=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for i in range(start + steps):
        x = torch.randn(8, 37, generator=g).to(dtype)
        if i < start:
            continue
        loss = model(x).float().pow(2).mean()
        if i % 2 == 0:
            loss = loss + model.unused(x[:, :3]).float().pow(2).mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()


def _assert_same(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_is_bitwise_the_ordinary_step_under_warmup_linear(name, dtype):
    cls, kwargs = OPTIMIZERS[name]
    runs = []
    for release in (False, True):
        model = _model(dtype)
        opt = cls(model.parameters(), lr=1e-2, gradient_release=release, **kwargs)
        sched = get_linear_schedule_with_warmup(opt, 2, 7)
        _train(opt, model, 6, scheduler=sched)
        runs.append((model, opt))
    (plain, o_plain), (released, o_rel) = runs
    assert o_rel.gradient_release and not o_plain.gradient_release
    _assert_same(plain, released)
    s_plain, s_rel = o_plain.state_dict()["state"], o_rel.state_dict()["state"]
    assert s_plain.keys() == s_rel.keys()
    for k in s_plain:
        for key, value in s_plain[k].items():
            assert not torch.is_tensor(value) or torch.equal(value, s_rel[k][key]), (k, key)
    # the last step's released gradient norm is the global norm the Trainer would log
    assert o_rel.released_grad_norm is not None and float(o_rel.released_grad_norm) > 0


def test_each_gradient_is_freed_before_the_next_one_arrives():
    """When a gradient arrives, every earlier gradient of this backward is already freed (not
    only unlinked from .grad); without release they all stay alive."""
    alive_at_arrival = {}
    for release in (True, False):
        model = _model()
        params = list(model.parameters())
        seen: list[weakref.ref] = []
        counts = alive_at_arrival[release] = []

        def track(p):  # registered before the optimizer's hook: runs first
            counts.append(sum(r() is not None for r in seen))
            seen.append(weakref.ref(p.grad))

        for p in params:
            p.register_post_accumulate_grad_hook(track)
        opt = hco.MicroAdam(params, gradient_release=release)
        model(torch.randn(2, 37)).pow(2).mean().backward()
        assert all((p.grad is None) == release for p in params[:6])
        opt.step()
    assert alive_at_arrival[True] == [0] * 6
    assert alive_at_arrival[False] == list(range(6))


def test_state_dict_round_trip_and_hooks_follow_the_optimizer():
    cls, kwargs = OPTIMIZERS["microadam"]
    model = _model()
    opt = cls(model.parameters(), lr=1e-2, gradient_release=True, **kwargs)
    _train(opt, model, 3)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = cls(twin.parameters(), lr=1e-2, gradient_release=True, **kwargs)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(opt, model, 3, start=3)
    _train(opt2, twin, 3, start=3)
    _assert_same(model, twin)
    # a new group gets hooks; remove_hooks() makes the step ordinary again
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    (extra * 2).sum().backward()
    assert extra.grad is None and int(opt.state[extra]["step"]) == 1
    opt.step()
    opt.remove_hooks()
    (extra * 2).sum().backward()
    assert extra.grad is not None
    # a dropped optimizer takes its hooks with it
    del opt, opt2
    gc.collect()
    model(torch.randn(2, 37)).sum().backward()
    assert all(p.grad is not None for p in model[0].parameters())


def test_second_gradient_before_step_is_refused():
    model = _model()
    opt = hco.MicroAdam(model.parameters(), gradient_release=True)
    model(torch.randn(2, 37)).sum().backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        model(torch.randn(2, 37)).sum().backward()
    opt.step()  # the next step works again
    model(torch.randn(2, 37)).sum().backward()


def test_distributed_runs_are_refused(monkeypatch):
    from torch.distributed.tensor import Shard

    class FakeMesh:
        def get_group(self, dim):
            return None

    class FakeShardedDTensor(torch.nn.Parameter):
        placements = (Shard(0),)
        device_mesh = FakeMesh()

        def to_local(self):
            return self.data

    with pytest.raises(ValueError, match="FSDP2"):
        hco.MicroAdam([FakeShardedDTensor(torch.randn(4, 3))], gradient_release=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="distributed training .2 processes.*DDP"):
        hco.SparseMFAC([torch.nn.Parameter(torch.randn(3))], gradient_release=True)


@pytest.mark.parametrize("name", ["microadam", "efcp_mfac"])
def test_nonfinite_gradient_under_release(name):
    cls, kwargs = OPTIMIZERS[name]
    model = _model()
    opt = cls(model.parameters(), lr=1e-2, gradient_release=True, **kwargs)
    _train(opt, model, 2)
    before = [p.detach().clone() for p in model.parameters()]
    bad = model[0].weight  # its gradient arrives last in backward
    bad.register_hook(lambda g: torch.full_like(g, float("nan")))
    model(torch.randn(2, 37)).pow(2).mean().backward()  # no warning inside backward
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        opt.step()
    assert len(record) == 1
    after = list(model.parameters())
    assert torch.equal(after[0], before[0])  # the non-finite parameter never moves
    if name == "efcp_mfac":  # global preconditioner: nothing moves, the count stays
        assert "error buffers" in str(record[0].message)
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert int(opt.state[opt._anchor()]["window_count"]) == 2
    else:  # per-parameter: the others took their step
        assert not torch.equal(after[2], before[2])


def test_per_param_clipping_is_the_same_in_both_paths_and_clips():
    results = []
    for release, clip in ((False, 0.05), (True, 0.05), (False, 0.0)):
        model = _model()
        opt = hco.MicroAdam(model.parameters(), lr=1e-2, gradient_release=release,
                            per_param_max_grad_norm=clip)
        _train(opt, model, 3)
        results.append(model)
    _assert_same(results[0], results[1])
    assert not torch.equal(results[0][0].weight, results[2][0].weight)
    # the rule is clip_grad_norm_'s, applied to one parameter
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.randn(5) * 10
    expected = p.grad.clone()
    expected.mul_(min(1.0, 1.0 / (float(expected.norm()) + 1e-6)))
    hco.MicroAdam([p], per_param_max_grad_norm=1.0).step()
    torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------- the stock Trainer
def test_trainer_release_equals_ordinary_and_resumes_bitwise(tmp_path):
    common = dict(optim="microadam", learning_rate=3e-3, max_steps=4, max_grad_norm=0.0,
                  lr_scheduler_type="linear", warmup_steps=2, save_steps=2)
    plain = Trainer(model=tiny_llama(seed=0), train_dataset=lm_dataset(32),
                    args=training_args(tmp_path / "plain", optim_args="window_size=3,density=0.05",
                                       **common))
    plain.train()
    full, resumed, saved = train_and_resume(
        tmp_path, 2, optim_args="window_size=3,density=0.05,gradient_release=true", **common)
    assert inner_optimizer(full.optimizer).gradient_release
    assert inner_optimizer(resumed.optimizer).gradient_release
    assert len(saved["state"]) == len(list(full.model.parameters()))  # the state is saved
    _assert_same(plain.model, full.model)
    _assert_same(full.model, resumed.model)
    assert losses(plain) == losses(full)


def test_trainer_default_clipping_warns_and_logs_the_released_norm(tmp_path):
    args = training_args(tmp_path, optim="microadam", optim_args="gradient_release=true",
                         max_steps=2)
    assert args.max_grad_norm == 1.0
    trainer = Trainer(model=tiny_llama(seed=0), train_dataset=lm_dataset(16), args=args)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0.*per_param_max_grad_norm"):
        trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and all(n > 0 for n in norms)  # not the 0 of the freed gradients


def test_trainer_refuses_accumulation_and_fp16(tmp_path):
    args = training_args(tmp_path, optim="efcp_mfac", optim_args="gradient_release=true",
                         gradient_accumulation_steps=2, max_steps=1)
    trainer = Trainer(model=tiny_llama(seed=0), train_dataset=lm_dataset(16), args=args)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="gradient accumulation .gradient_accumulation_steps=2"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ValueError, match="fp16"):
        check_trainer_args(types.SimpleNamespace(gradient_accumulation_steps=1, fp16=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer_args(types.SimpleNamespace(gradient_accumulation_steps=1, fp16=False,
                                                 max_grad_norm=0.0))


@pytest.mark.slow  # two fresh processes (~40 s); the weakref test above covers the behaviour
def test_peak_process_memory_saves_most_of_the_gradient_bytes():
    """Six 2048x2048 fp32 layers at batch 1 (gradients >> activations), MicroAdam with and
    without release, each in a fresh process: the peak drops by >= 60% of the gradient bytes."""
    from _hf_utils import load_recipe

    bench = load_recipe("benchmarks.release")
    args = bench.parse_args(["--part", "grads", "--steps", "2", "--repeats", "1"])
    res = bench.measure_grads(args, args.mmap_threshold)
    assert res["saving"]["fraction_of_grad_bytes"] >= 0.6, res
