"""MicroAdam optimizer: Adam equivalence, truncated-window formula, dtypes, contract, bad input."""

import copy
import re
import math
import warnings

import pytest
import torch

from hf_compressed_optim import MicroAdam, optimizer_memory_report

from _numerics import fit_losses, random_steps as _train, reloaded


def _bf16_exact(shape, gen):
    return torch.randn(shape, generator=gen).bfloat16().float()


def _pair(shape=(37, 29), seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape))
    return p, torch.nn.Parameter(p.detach().clone())


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_full_density_equals_adamw_within_window(wd):
    p, q = _pair()
    m = 8
    opt = MicroAdam([p], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, window_size=m,
                    density=1.0)
    ref = torch.optim.AdamW([q], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    for _ in range(m):
        grad = _bf16_exact(p.shape, g)
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert not torch.equal(p, torch.zeros_like(p))


def test_per_group_lr_and_weight_decay_and_scheduler():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(20, 5)), torch.nn.Parameter(torch.randn(7))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    def groups(x, y):
        return [{"params": [x], "weight_decay": 0.2}, {"params": [y], "lr": 1e-2}]
    opt = MicroAdam(groups(a, b), lr=1e-3, density=1.0, weight_decay=0.0, window_size=6)
    ref = torch.optim.AdamW(groups(a2, b2), lr=1e-3, weight_decay=0.0)
    sch = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, ref)]
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for x, y in ((a, a2), (b, b2)):
            grad = _bf16_exact(x.shape, g)
            x.grad, y.grad = grad.clone(), grad.clone()
        opt.step(), ref.step()
        for s in sch:
            s.step()
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-6)


def test_truncated_window_formula_after_window_fills():
    """For t > m: m_hat = c1 * sum of the last m gradients weighted beta1^age (global-t bias)."""
    m, b1, b2, eps, lr = 4, 0.9, 0.99, 1e-8, 1e-2
    p = torch.nn.Parameter(torch.randn(300))
    expected = p.detach().double().clone()
    opt = MicroAdam([p], lr=lr, betas=(b1, b2), eps=eps, window_size=m, density=1.0)
    g = torch.Generator().manual_seed(5)
    history = []
    for t in range(1, 13):
        grad = _bf16_exact(p.shape, g)
        history.append(grad.double())
        p.grad = grad
        opt.step()
        last = history[-m:]
        mh = sum(b1 ** age * x for age, x in enumerate(reversed(last))) * (1 - b1) / (1 - b1 ** t)
        vh = sum(b2 ** age * x * x for age, x in enumerate(reversed(last))) * (1 - b2) / (1 - b2 ** t)
        expected -= lr * mh / (vh.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,expected", [(10, 1.0), (11, 0.995), (20, 1.05), (50, 1.45)])
def test_constant_gradient_step_size_table(t, expected):
    """Spec table (microadam.md 2.3a): |u| for a constant gradient, m=10, betas (0.9, 0.999)."""
    p = torch.nn.Parameter(torch.zeros(64))
    opt = MicroAdam([p], lr=1.0, window_size=10, density=1.0, eps=1e-12)
    for _ in range(t):
        before = p.detach().clone()
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    step = (before - p.detach()).abs().mean().item()
    assert step == pytest.approx(expected, abs=6e-3)


def test_sparse_density_touches_only_window_entries():
    p = torch.nn.Parameter(torch.randn(4096))
    before = p.detach().clone()
    opt = MicroAdam([p], lr=1e-2, window_size=3, density=0.01, topk_block_size=1024)
    p.grad = torch.randn_like(p)
    opt.step()
    changed = (p.detach() != before).sum().item()
    assert changed == opt.state[p]["window_indices"].shape[1] == 4 * 11


def test_grad_is_left_intact_and_state_layout():
    p = torch.nn.Parameter(torch.randn(100, 30, dtype=torch.bfloat16))
    grad = torch.randn_like(p)
    p.grad = grad.clone()
    opt = MicroAdam([p], lr=1e-3)
    opt.step()
    assert torch.equal(p.grad, grad)
    s = opt.state[p]
    assert s["window_indices"].dtype == torch.int16 and s["window_indices"].shape == (10, 30)
    assert s["window_values"].dtype == torch.bfloat16
    assert s["ef_codes"].dtype == torch.uint8 and s["ef_codes"].numel() == 1500
    assert s["ef_min"].dtype == torch.bfloat16 and s["ef_min"].numel() == math.ceil(3000 / 64)
    assert int(s["step"]) == 1 and p.dtype == torch.bfloat16


def test_state_at_defaults_is_below_one_byte_per_param():
    p = torch.nn.Parameter(torch.zeros(2048, 1024))
    opt = MicroAdam([p])
    p.grad = torch.randn_like(p)
    opt.step()
    report = optimizer_memory_report(opt)
    assert 0.9 < report["optimizer_state_bytes_per_param"] <= 1.0
    # formula: 0.5 (codes) + 4/64 (bf16 min+max) + 4 * m * k / d
    k = opt.state[p]["window_indices"].shape[1]
    assert report["optimizer_state_bytes"] == pytest.approx(p.numel() * (0.5 + 4 / 64) + 40 * k, abs=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_param_dtypes_train_and_keep_dtype(dtype):
    torch.manual_seed(0)
    target = torch.randn(64, 16)
    w = torch.nn.Parameter(torch.zeros(64, 16, dtype=dtype))
    losses = fit_losses(MicroAdam([w], lr=5e-2, density=0.25, window_size=5), w, target, 60)
    assert w.dtype == dtype and torch.isfinite(w.float()).all()
    assert losses[-1] < 0.5 * losses[0]


def test_stochastic_rounding_is_deterministic_and_differs_from_nearest():
    def run(sr, seed=0):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4000, dtype=torch.bfloat16))
        opt = MicroAdam([w], lr=1e-4, density=0.5, stochastic_rounding=sr, seed=seed)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            w.grad = torch.randn(4000, generator=g).bfloat16()
            opt.step()
        return w.detach().clone()
    a, b = run(True), run(True)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(False))
    assert not torch.equal(a, run(True, seed=1))


def test_skipped_steps_use_per_parameter_counter():
    """A param whose grad is None on some steps equals that param optimized alone."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    alone = torch.nn.Parameter(b.detach().clone())
    opt = MicroAdam([a, b], lr=1e-2, window_size=3, density=0.3)
    opt_alone = MicroAdam([alone], lr=1e-2, window_size=3, density=0.3)
    g = torch.Generator().manual_seed(2)
    for t in range(8):
        a.grad = torch.randn(50, generator=g)
        gb = torch.randn(50, generator=g)
        b.grad = gb.clone() if t % 3 else None
        opt.step()
        if t % 3:
            alone.grad = gb.clone()
            opt_alone.step()
    assert torch.equal(b, alone)
    assert int(opt.state[b]["step"]) == int(opt_alone.state[alone]["step"]) == 5
    assert int(opt.state[a]["step"]) == 8


def test_empty_groups_zero_numel_and_no_grad():
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    p = torch.nn.Parameter(torch.randn(10))
    nograd = torch.nn.Parameter(torch.randn(3))
    opt = MicroAdam([{"params": []}, {"params": [empty, p, nograd]}], lr=1e-2)
    empty.grad = torch.zeros(0, 4)
    p.grad = torch.randn(10)
    opt.step()
    assert nograd not in opt.state
    assert opt.state[empty]["window_indices"].numel() == 0


def test_checkpoint_template_step_has_no_side_effect():
    p = torch.nn.Parameter(torch.randn(40))
    before = p.detach().clone()
    opt = MicroAdam([p], lr=0.0, weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, before) and int(opt.state[p]["step"]) == 0
    assert not opt.state[p]["window_values"].any()


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MicroAdam([p])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss
    assert opt.step(closure).item() == 3.0


# ------------------------------------------------------------------ checkpoints
def test_save_resume_bitwise_with_bf16_params_and_weights_only():
    torch.manual_seed(0)
    def make():
        return [torch.nn.Parameter(torch.randn(300, 70).bfloat16()),
                        torch.nn.Parameter(torch.randn(33).bfloat16())]
    params = make()
    opt = MicroAdam(params, lr=1e-3, weight_decay=0.01, window_size=4, density=0.05,
                    topk_block_size=4096, stochastic_rounding=True)
    _train(opt, params, 5, seed=1)
    opt2, params2 = reloaded(opt, params, lambda ps: MicroAdam(
        ps, lr=1e-3, weight_decay=0.01, window_size=4, density=0.05, topk_block_size=4096,
        stochastic_rounding=True))
    _train(opt, params, 4, seed=2)
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        for key in ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max", "step"):
            assert s2[key].dtype == s[key].dtype, key
    # the indices carry values far above 256 (what a bf16 cast would corrupt)
    assert opt2.state[params2[0]]["window_indices"].max() > 2000
    _train(opt2, params2, 4, seed=2)
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


def test_vanilla_torch_loader_would_corrupt_state():
    """Guards the override: torch's own loader casts int16/uint8 state to the param dtype."""
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = MicroAdam([p], density=0.05)
    _train(opt, [p], 2, seed=0)
    sd = opt.state_dict()
    plain = torch.optim.Adam([p])
    torch.optim.Optimizer.load_state_dict(plain, sd)
    assert plain.state[p]["window_indices"].dtype == torch.bfloat16  # what we defeat
    fresh = MicroAdam([p], density=0.05)
    fresh.load_state_dict(sd)
    assert fresh.state[p]["window_indices"].dtype == torch.int16
    assert torch.equal(fresh.state[p]["window_indices"], opt.state[p]["window_indices"])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,name", [
    ({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas[0]"), ({"betas": (0.9, -0.1)}, "betas[1]"),
    ({"betas": 0.9}, "betas"), ({"eps": 0.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"window_size": 0}, "window_size"), ({"window_size": 2.5}, "window_size"),
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
    ({"quant_block_size": 63}, "quant_block_size"), ({"quant_block_size": 0}, "quant_block_size"),
    ({"topk_block_size": 40000}, "topk_block_size"), ({"stochastic_rounding": "yes"}, "stochastic_rounding"),
    ({"nonfinite": "ignore"}, "nonfinite"), ({"seed": -1}, "seed"), ({"lr": float("nan")}, "lr"),
    ({"alpha": 1.0}, "alpha"), ({"alpha": -0.5}, "alpha"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match="^" + re.escape(name) + " "):
        MicroAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradient_raises_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MicroAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_is_skipped_and_counted(bad):
    a, b = torch.nn.Parameter(torch.randn(20)), torch.nn.Parameter(torch.randn(20))
    opt = MicroAdam([a, b], lr=1e-2, density=0.5)
    _train(opt, [a, b], 2, seed=0)
    snap = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn(20)
    a.grad[3] = bad
    b.grad = torch.randn(20)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(a, a_before) and not torch.equal(b, b_before)
    for k, v in snap.items():
        if k != "nonfinite_skips":
            assert torch.equal(opt.state[a][k], v), k
    assert opt.nonfinite_skips == 1
    # training continues normally afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, [a, b], 1, seed=3)
    assert torch.isfinite(a).all() and not torch.equal(a, a_before)


def test_nonfinite_gradient_can_raise():
    a = torch.nn.Parameter(torch.randn(20))
    opt = MicroAdam([a], nonfinite="raise")
    a.grad = torch.full((20,), float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step()
    assert int(opt.state[a]["step"]) == 0 and torch.isfinite(a).all()


def test_reference_aliases_m_and_k_init():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = MicroAdam([p], m=3, k_init=0.02)
    assert opt.param_groups[0]["window_size"] == 3 and opt.param_groups[0]["density"] == 0.02


def test_alpha_zero_is_the_default_and_bitwise_unchanged():
    p, q = _pair((40, 33))
    a = MicroAdam([p], lr=1e-2, density=0.05, window_size=3)
    b = MicroAdam([q], lr=1e-2, density=0.05, window_size=3, alpha=0.0)
    assert a.param_groups[0]["alpha"] == 0.0
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        a.step(), b.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_alpha_densifies_with_the_error_buffer(wd):
    """alpha > 0: the step also applies lr * alpha * Q^-1(e) (e just written) and the buffer
    keeps Q((1 - alpha) Q^-1(e)); checked against the alpha = 0 step plus that correction."""
    from hf_compressed_optim.kernels import quant4 as Q

    alpha, lr, qb = 0.25, 1e-2, 64
    p, q = _pair((50, 41))
    dense = MicroAdam([p], lr=lr, weight_decay=wd, density=0.05, window_size=3, alpha=alpha)
    plain = MicroAdam([q], lr=lr, weight_decay=wd, density=0.05, window_size=3)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        # the plain optimizer starts each step from the densified one's state and parameters
        plain.load_state_dict(copy.deepcopy(dense.state_dict()))  # torch's loader aliases
        plain.param_groups[0]["alpha"] = 0.0  # the loaded groups carry the saved alpha
        with torch.no_grad():
            q.copy_(p)
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        dense.step(), plain.step()
        sq = plain.state[q]
        err = Q.dequantize4(sq["ef_codes"], sq["ef_min"], sq["ef_max"], q.numel(), qb)
        want = q.detach().reshape(-1) - lr * alpha * err
        torch.testing.assert_close(p.detach().reshape(-1), want, rtol=1e-6, atol=1e-7)
        codes = torch.empty_like(sq["ef_codes"])
        lo, hi = torch.empty_like(sq["ef_min"]), torch.empty_like(sq["ef_max"])
        Q.quantize4(err * (1 - alpha), qb, codes, lo, hi)
        sp = dense.state[p]
        assert torch.equal(sp["ef_codes"], codes) and torch.equal(sp["ef_min"], lo)
        assert torch.equal(sp["ef_max"], hi)
        assert not torch.equal(p, q)


def test_alpha_through_optim_args():
    from hf_compressed_optim import MicroAdamConfig

    assert MicroAdamConfig.from_options({"alpha": "0.5"}, optim="microadam").alpha == 0.5
    with pytest.raises(ValueError, match="alpha"):
        MicroAdamConfig.from_options({"alpha": "1"}, optim="microadam")
    with pytest.raises(ValueError, match="alpha"):
        MicroAdam([torch.nn.Parameter(torch.zeros(3))], alpha=1.0)
