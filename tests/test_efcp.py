"""SparseMFAC / SparseGGT: dense float64 formulas at density 1, the sparse window against the
same formulas, error feedback conservation, state layout, checkpoints, the contract, bad input."""

import re
import warnings

import pytest
import torch

from hf_compressed_optim import optimizer_memory_report
from hf_compressed_optim.efcp import lowrank as LR
from hf_compressed_optim.efcp.window import layout_of
from hf_compressed_optim.kernels.topk import absolute_indices
from hf_compressed_optim import SparseGGT as _SparseGGT, SparseMFAC as _SparseMFAC

from _numerics import fit_losses, random_steps as _train, reloaded


def _paper(cls, **paper):
    """``cls`` with the papers' defaults (raw lr semantics, fp32 error buffer, their windows):
    the reference formulas below are the papers'; the package's defaults are tested in
    tests/test_drop_in.py."""
    class Paper(cls):
        def __init__(self, params, config=None, **options):
            super().__init__(params, config, **({**paper, **options} if config is None else options))

    Paper.__name__ = Paper.__qualname__ = cls.__name__
    return Paper


SparseMFAC = _paper(_SparseMFAC, lr_mode="raw", ef_bits=32, window_size=1024)
SparseGGT = _paper(_SparseGGT, lr_mode="raw", ef_bits=32, window_size=100)


# ------------------------------------------------------------------ float64 references
def mfac_dense(rows, x, damp, norm):
    """(damp I + (1/norm) G^T G)^-1 x with an explicit inverse; ``rows``: list of d-vectors."""
    d = x.numel()
    G = torch.stack(rows).double() if rows else torch.zeros(0, d, dtype=torch.float64)
    F = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / norm
    return torch.linalg.inv(F) @ x.double()


def mfac_woodbury64(rows, x, damp, norm):
    """The same through Woodbury in float64 (for d too large for an explicit inverse)."""
    G = rows.double()
    A = norm * damp * torch.eye(G.shape[0], dtype=torch.float64) + G @ G.T
    return (x.double() - G.T @ torch.linalg.solve(A, G @ x.double())) / damp


def ggt_dense(rows, x, eps):
    """(eps I + (G^T G)^(1/2))^-1 x by an explicit eigen-decomposition of the d x d matrix."""
    G = torch.stack(rows).double()
    evals, U = torch.linalg.eigh(G.T @ G)
    root = U @ torch.diag(evals.clamp_min(0).sqrt()) @ U.T
    return torch.linalg.inv(eps * torch.eye(x.numel(), dtype=torch.float64) + root) @ x.double()


def _params(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # 91 elements = 2 Top-K blocks of 32 + a tail of 27 (with topk_block_size=32), plus a bias
    return [torch.nn.Parameter(torch.randn(13, 7, dtype=dtype)),
            torch.nn.Parameter(torch.randn(9, dtype=dtype))]


def _flat(params):
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def _step(opt, params, gen, scale=1.0):
    grads = [torch.randn(p.shape, generator=gen) * scale for p in params]
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    before = _flat(params)
    opt.step()
    return torch.cat([g.reshape(-1).double() for g in grads]), before - _flat(params)


def _window_rows(opt, params, nrows):
    """The stored window rows of the whole model, densified (float64 [nrows, d])."""
    parts = []
    for p in params:
        s = opt.state[p]
        if "window_left" in s:
            L, Rt = s["window_left"][:nrows].double(), s["window_right"][:nrows].double()
            parts.append(torch.einsum("iar,ibr->iab", L, Rt).reshape(nrows, -1))
            continue
        layout = layout_of(s, p.numel())
        dense = torch.zeros(nrows, p.numel(), dtype=torch.float64)
        for i in range(nrows):
            pos = absolute_indices(s["window_indices"][i], layout)
            dense[i, pos] = s["window_values"][i].double()
        parts.append(dense)
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------ density 1: dense formulas
@pytest.mark.parametrize("fix_scaling", [False, True])
def test_mfac_full_density_equals_dense_formula_filling_and_full(fix_scaling):
    params = _params()
    m, damp, lr = 4, 0.1, 1.0
    opt = SparseMFAC(params, lr=lr, damp=damp, window_size=m, density=1.0, value_dtype="fp32",
                     topk_block_size=32, fix_scaling=fix_scaling)
    gen = torch.Generator().manual_seed(1)
    history = []
    for t in range(1, m + 4):  # t <= m: the window fills; t > m: the ring wraps
        g, delta = _step(opt, params, gen)
        history.append(g)
        norm = min(t, m) if fix_scaling else m
        expected = mfac_dense(history[-m:], g, damp, norm)
        torch.testing.assert_close(delta / lr, expected, rtol=2e-5, atol=2e-5 * expected.abs().max())
    # the two normalisations really differ while filling (guards the option)
    assert int(opt.state[params[0]]["window_count"]) == m + 3


def test_mfac_normalisations_differ_while_filling():
    out = []
    for fix in (False, True):
        params = _params()
        opt = SparseMFAC(params, lr=1.0, damp=0.1, window_size=4, density=1.0,
                         value_dtype="fp32", fix_scaling=fix)
        gen = torch.Generator().manual_seed(1)
        out.append(_step(opt, params, gen)[1])
    assert not torch.allclose(out[0], out[1], rtol=1e-3)


def test_ggt_full_density_equals_dense_formula_filling_and_full():
    params = _params()
    m, eps, lr = 5, 1e-2, 1.0
    opt = SparseGGT(params, lr=lr, eps=eps, window_size=m, density=1.0, value_dtype="fp32",
                    topk_block_size=32)
    gen = torch.Generator().manual_seed(2)
    history = []
    for t in range(1, m + 4):
        g, delta = _step(opt, params, gen)
        history.append(g)
        expected = ggt_dense(history[-m:], g, eps)
        torch.testing.assert_close(delta / lr, expected, rtol=2e-5,
                                   atol=2e-5 * expected.abs().max())


# ------------------------------------------------------------------ sparse window vs formulas
@pytest.mark.parametrize("cls,kwargs", [
    (SparseMFAC, dict(damp=0.05)), (SparseMFAC, dict(damp=0.05, value_dtype="bf16", ef_bits=4)),
    (SparseGGT, dict(eps=1e-2)), (SparseMFAC, dict(damp=0.05, compressor="lowrank", rank=2)),
    (SparseGGT, dict(eps=1e-2, compressor="lowrank", rank=2, value_dtype="bf16")),
])
def test_sparse_update_is_the_formula_on_the_stored_window(cls, kwargs):
    """At density 0.1 (or rank 2) the update is the dense formula applied to the compressed
    accumulator with the window the optimizer actually stores."""
    params = _params()
    m = 3
    kw = dict(lr=1.0, window_size=m, density=0.1, topk_block_size=32, value_dtype="fp32")
    kw.update(kwargs)
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 7):
        _, delta = _step(opt, params, gen)
        nrows = min(t, m)
        rows = _window_rows(opt, params, nrows)
        c = rows[(t - 1) % m]
        assert c.count_nonzero() > 0
        if cls is SparseMFAC:
            expected = mfac_dense(list(rows), c, kw["damp"], m)
        else:
            expected = ggt_dense(list(rows), c, kw["eps"])
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("compressor,vdtype", [("topk", "fp32"), ("topk", "bf16"),
                                               ("lowrank", "fp32")])
def test_error_feedback_conservation(compressor, vdtype):
    """sum_s c_s + e_t == sum_s g_s (nothing is lost, only delayed)."""
    params = _params()
    steps = 6
    opt = SparseMFAC(params, lr=1e-3, window_size=steps, density=0.05, compressor=compressor,
                     rank=1, value_dtype=vdtype, topk_block_size=32)
    gen = torch.Generator().manual_seed(4)
    total = 0
    for _ in range(steps):
        g, _ = _step(opt, params, gen)
        total = total + g
    compressed = _window_rows(opt, params, steps).sum(0)
    error = torch.cat([opt.state[p]["ef"].double() for p in params])
    assert error.abs().max() > 0.1  # the compression really dropped something
    torch.testing.assert_close(compressed + error, total, rtol=0, atol=1e-5)


def test_lowrank_dot_identity_and_power_step():
    g = torch.Generator().manual_seed(5)
    La, Ra = torch.randn(3, 6, 2, generator=g).double(), torch.randn(3, 4, 2, generator=g).double()
    Lb, Rb = torch.randn(6, 2, generator=g).double(), torch.randn(4, 2, generator=g).double()
    dots = LR.factor_dots(La, Ra, Lb, Rb, 3)
    dense = torch.stack([(La[i] @ Ra[i].T).double().flatten() @ (Lb @ Rb.T).double().flatten()
                         for i in range(3)])
    torch.testing.assert_close(dots, dense)
    X = torch.randn(6, 4, generator=g).double()
    torch.testing.assert_close(LR.dense_dots(La, Ra, X, 2), dense_x := torch.stack(
        [(La[i] @ Ra[i].T).double().flatten() @ X.double().flatten() for i in range(2)]))
    # one warm-started power step on a rank-2 matrix reproduces it exactly
    A = torch.randn(6, 2, generator=g) @ torch.randn(2, 4, generator=g)
    q = torch.randn(4, 2, generator=g)
    P, Q = LR.power_step(A, q)
    torch.testing.assert_close(P.T @ P, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ Q.T, A, atol=1e-5, rtol=0)
    assert dense_x.shape == (2,)


# ------------------------------------------------------------------ optimizer semantics
def test_param_without_grad_contributes_a_zero_slice_and_is_not_updated():
    params = _params()
    opt = SparseMFAC(params, lr=1.0, damp=0.1, window_size=3, density=1.0, value_dtype="fp32")
    gen = torch.Generator().manual_seed(6)
    history = []
    for t in range(5):
        if t != 3:
            g, delta = _step(opt, params, gen)
        else:
            params[0].grad = torch.randn(13, 7, generator=gen)
            params[1].grad = None
            before = _flat(params)
            opt.step()
            delta = before - _flat(params)
            g = torch.cat([params[0].grad.reshape(-1).double(), torch.zeros(9, dtype=torch.float64)])
            assert delta[91:].abs().max() == 0  # the bias did not move
        history.append(g)
        expected = mfac_dense(history[-3:], g, 0.1, 3)
        torch.testing.assert_close(delta[:91], expected[:91], rtol=2e-5,
                                   atol=2e-5 * expected.abs().max())
    assert int(opt.state[params[1]]["step"]) == 4 and int(opt.state[params[0]]["step"]) == 5


@pytest.mark.parametrize("mode", ["decoupled_lr_scaled", "decoupled_unscaled", "l2"])
def test_weight_decay_modes_per_group(mode):
    params = _params()
    lr, wd, damp = 0.5, 0.1, 0.2
    opt = SparseMFAC([{"params": [params[0]], "weight_decay": wd},
                      {"params": [params[1]], "weight_decay": 0.0}], lr=lr, damp=damp,
                     window_size=3, density=1.0, value_dtype="fp32", wd_mode=mode)
    gen = torch.Generator().manual_seed(7)
    history = []
    for t in range(4):
        theta = _flat(params)
        g, delta = _step(opt, params, gen)
        history.append(g)
        wd_vec = torch.cat([torch.full((91,), wd, dtype=torch.float64),
                            torch.zeros(9, dtype=torch.float64)])
        if mode == "l2":
            expected = lr * mfac_dense(history[-3:], g + wd_vec * theta, damp, 3)
        else:
            decay = lr * wd_vec if mode == "decoupled_lr_scaled" else wd_vec
            expected = decay * theta + lr * mfac_dense(history[-3:], g, damp, 3)
        torch.testing.assert_close(delta, expected, rtol=2e-5, atol=2e-5 * expected.abs().max())


def test_momentum_has_no_dampening():
    def run(mu):
        params = _params()
        opt = SparseGGT(params, lr=0.1, eps=0.1, window_size=3, density=0.2, momentum=mu)
        gen = torch.Generator().manual_seed(8)
        return [_step(opt, params, gen)[1] for _ in range(5)]
    plain, heavy = run(0.0), run(0.5)
    v = 0
    for u, got in zip(plain, heavy):
        v = 0.5 * v + u
        torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-6)


def test_per_group_lr_and_tensor_lr():
    params = _params()
    opt = SparseMFAC([{"params": [params[0]], "lr": torch.tensor(0.2)},
                      {"params": [params[1]], "lr": 0.05}], damp=0.1, window_size=2,
                     density=1.0, value_dtype="fp32")
    ref_params = _params()
    ref = SparseMFAC(ref_params, lr=1.0, damp=0.1, window_size=2, density=1.0,
                     value_dtype="fp32")
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        _, d = _step(opt, params, g1)
        _, u = _step(ref, ref_params, g2)
        ref_params[0].data.copy_(params[0].data), ref_params[1].data.copy_(params[1].data)
        torch.testing.assert_close(d[:91], 0.2 * u[:91], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d[91:], 0.05 * u[91:], rtol=1e-4, atol=1e-6)


def test_state_layout_global_tensors_on_first_param_and_memory():
    p = torch.nn.Parameter(torch.randn(300, 200))
    b = torch.nn.Parameter(torch.randn(200))
    opt = SparseMFAC([{"params": []}, {"params": [p, b]}], window_size=64, density=0.01)
    assert not opt.state  # lazy
    p.grad, b.grad = torch.randn_like(p), torch.randn_like(b)
    opt.step()
    s, sb = opt.state[p], opt.state[b]
    assert s["gram"].shape == (64, 64) and s["gram"].dtype == torch.float64
    assert int(s["window_count"]) == 1 and "gram" not in sb
    assert s["window_indices"].dtype == torch.int16 and s["window_values"].dtype == torch.bfloat16
    assert s["window_indices"].shape == (64, 3 * 164 + 109)  # 3 blocks of 16384 + a tail
    assert s["ef"].dtype == torch.float32 and int(s["step"]) == 1
    rep = optimizer_memory_report(opt)
    k = s["window_indices"].shape[1] + sb["window_indices"].shape[1]
    assert rep["optimizer_state_bytes/window"] == 64 * k * 4
    assert rep["optimizer_state_bytes/error_feedback"] == 4 * (p.numel() + b.numel())
    assert rep["optimizer_state_bytes/preconditioner"] == 64 * 64 * 8


def test_ef_bits_storage():
    for bits, keys in ((4, {"ef_codes": torch.uint8, "ef_min": torch.bfloat16}),
                       (16, {"ef": torch.bfloat16}), (32, {"ef": torch.float32})):
        p = torch.nn.Parameter(torch.randn(1001))
        opt = SparseGGT([p], window_size=4, density=0.05, ef_bits=bits)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        for key, dtype in keys.items():
            assert opt.state[p][key].dtype == dtype
        assert torch.isfinite(p).all()


def test_indices_beyond_int16_positions_are_exact():
    """A parameter with > 65535 elements and Top-K blocks at the int16 limit."""
    p = torch.nn.Parameter(torch.zeros(70000))
    opt = SparseMFAC([p], lr=1.0, damp=0.5, window_size=2, density=0.001, topk_block_size=32768,
                     value_dtype="fp32")
    gen = torch.Generator().manual_seed(10)
    for t in range(1, 4):
        _, delta = _step(opt, [p], gen)
        rows = _window_rows(opt, [p], min(t, 2))
        c = rows[(t - 1) % 2]
        assert c[65536:].count_nonzero() > 0
        expected = mfac_woodbury64(rows, c, 0.5, 2)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)
    assert int(opt.state[p]["window_indices"].max()) > 30000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [SparseMFAC, SparseGGT])
def test_param_dtypes_train_and_keep_dtype(cls, dtype):
    torch.manual_seed(0)
    target = torch.randn(64, 16)
    w = torch.nn.Parameter(torch.zeros(64, 16, dtype=dtype))
    # M-FAC's steps are Newton-like (lr ~ 1); GGT's are AdaGrad-like
    kw = dict(damp=1e-2, lr=1.0) if cls is SparseMFAC else dict(eps=1e-2, lr=3.0)
    losses = fit_losses(cls([w], density=0.25, window_size=8, **kw), w, target, 40)
    assert w.dtype == dtype and torch.isfinite(w.float()).all()
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_grad_intact_empty_groups_zero_numel_and_closure():
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    p = torch.nn.Parameter(torch.randn(10))
    opt = SparseMFAC([{"params": []}, {"params": [empty, p]}], lr=1e-2, window_size=4,
                     compressor="lowrank")
    grad = torch.randn(10)

    def closure():
        empty.grad = torch.zeros(0, 4)
        p.grad = grad.clone()
        return torch.tensor(3.0)
    assert opt.step(closure).item() == 3.0
    assert torch.equal(p.grad, grad)
    assert opt.state[empty]["window_values"].numel() == 0
    assert "gram" in opt.state[empty]  # the anchor is the first param of the first non-empty group


def test_checkpoint_template_step_has_no_side_effect():
    p = torch.nn.Parameter(torch.randn(40))
    before = p.detach().clone()
    opt = SparseMFAC([p], lr=0.0, weight_decay=0.1, window_size=4)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, before) and int(opt.state[p]["step"]) == 0
    assert int(opt.state[p]["window_count"]) == 0 and not opt.state[p]["gram"].any()


# ------------------------------------------------------------------ non-finite gradients
def _snapshot(opt):
    return {(i, k): v.clone() for i, s in enumerate(opt.state.values())
            for k, v in s.items() if torch.is_tensor(v) and k != "nonfinite_skips"}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_the_whole_step(bad):
    params = _params()
    opt = SparseMFAC(params, lr=1e-2, window_size=3, density=0.2, ef_bits=4)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        _step(opt, params, gen)
    snap, before = _snapshot(opt), _flat(params)
    params[0].grad = torch.randn(13, 7)
    params[1].grad = torch.randn(9)
    params[1].grad[3] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(_flat(params), before)
    after = _snapshot(opt)
    assert snap.keys() == after.keys()
    assert all(torch.equal(snap[k], after[k]) for k in snap)
    assert opt.nonfinite_skips == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt, params, gen)  # and it keeps going
    assert int(opt.state[params[0]]["window_count"]) == 3

    strict = SparseGGT(params, nonfinite="raise")
    params[1].grad[0] = bad
    with pytest.raises(FloatingPointError):
        strict.step()
    assert not any(k in strict.state.get(params[0], {}) for k in ("window_values", "ef"))


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("cls,kwargs", [
    (SparseMFAC, dict(ef_bits=4, momentum=0.9, weight_decay=0.01)),
    (SparseGGT, dict(compressor="lowrank", rank=2, ef_bits=16)),
])
def test_save_resume_bitwise_with_bf16_params_and_weights_only(cls, kwargs):
    torch.manual_seed(0)
    def make():
        return [torch.nn.Parameter(torch.randn(300, 70).bfloat16()),
                        torch.nn.Parameter(torch.randn(33).bfloat16())]
    params = make()
    kw = dict(lr=1e-4, window_size=4, density=0.05, topk_block_size=4096, **kwargs)
    opt = cls(params, **kw)
    _train(opt, params, 6, seed=1)  # the ring wrapped
    opt2, params2 = reloaded(opt, params, lambda ps: cls(ps, **kw))
    _train(opt, params, 4, seed=2)
    for p, p2 in zip(params, params2):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert opt2.state[p2][key].dtype == value.dtype, key
    if "window_indices" in opt2.state[params2[0]]:
        assert opt2.state[params2[0]]["window_indices"].max() > 2000
    _train(opt2, params2, 4, seed=2)
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
    for key, value in opt.state[params[0]].items():
        if torch.is_tensor(value):
            assert torch.equal(value, opt2.state[params2[0]][key]), key


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls,kwargs,name", [
    (SparseMFAC, {"lr": -1.0}, "lr"), (SparseMFAC, {"damp": 0.0}, "damp"),
    (SparseMFAC, {"damp": float("inf")}, "damp"), (SparseGGT, {"eps": -1e-3}, "eps"),
    (SparseMFAC, {"window_size": 0}, "window_size"), (SparseGGT, {"window_size": 9000}, "window_size"),
    (SparseMFAC, {"window_size": 4.0}, "window_size"), (SparseMFAC, {"density": 0.0}, "density"),
    (SparseGGT, {"density": 1.01}, "density"), (SparseMFAC, {"weight_decay": -1}, "weight_decay"),
    (SparseMFAC, {"momentum": 1.0}, "momentum"), (SparseMFAC, {"compressor": "svd"}, "compressor"),
    (SparseMFAC, {"rank": 0}, "rank"), (SparseGGT, {"ef_bits": 8}, "ef_bits"),
    (SparseMFAC, {"ef_bits": True}, "ef_bits"), (SparseMFAC, {"value_dtype": "fp16"}, "value_dtype"),
    (SparseMFAC, {"wd_mode": "adamw"}, "wd_mode"), (SparseMFAC, {"fix_scaling": 1}, "fix_scaling"),
    (SparseMFAC, {"topk_block_size": 40000}, "topk_block_size"),
    (SparseGGT, {"quant_block_size": 63}, "quant_block_size"), (SparseMFAC, {"seed": -1}, "seed"),
    (SparseMFAC, {"nonfinite": "ignore"}, "nonfinite"), (SparseMFAC, {"m": 0}, "window_size"),
    (SparseMFAC, {"k_init": 2.0}, "density"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(cls, kwargs, name):
    with pytest.raises(ValueError, match="^" + re.escape(name) + " "):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_global_hyperparameters_must_agree_across_groups():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = SparseMFAC([{"params": [a]}, {"params": [b], "window_size": 8}], window_size=4)
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    with pytest.raises(ValueError, match="^window_size must be the same in every parameter group"):
        opt.step()
    opt = SparseGGT([{"params": [a]}, {"params": [b], "eps": 1.0}])
    with pytest.raises(ValueError, match="^eps must be the same"):
        opt.step()


def test_sparse_gradient_raises_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SparseMFAC(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SparseMFAC, SparseGGT])
def test_cuda_steps_match_cpu(cuda_device, cls):
    cpu = _params()
    gpu = [torch.nn.Parameter(p.detach().to(cuda_device)) for p in cpu]
    kw = dict(lr=0.1, window_size=3, density=0.1, topk_block_size=32, value_dtype="fp32")
    o_cpu, o_gpu = cls(cpu, **kw), cls(gpu, **kw)
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        for a, b in zip(cpu, gpu):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g, g.to(cuda_device)
        o_cpu.step()
        o_gpu.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5)
    assert o_gpu.state[gpu[0]]["gram"].device.type == "cuda"


def test_lowrank_compressor_refuses_sharded_dtensor_parameters():
    """FSDP2 row shards have no low-rank factor of the whole matrix: a clear error, not a wrong
    preconditioner (top-k works on shards: tests/test_fsdp2.py)."""
    from torch.distributed.tensor import Shard

    class FakeMesh:
        def get_group(self, dim):
            return None  # a one-process "mesh": nothing to reduce over

    class FakeShardedDTensor(torch.nn.Parameter):
        placements = (Shard(0),)
        device_mesh = FakeMesh()

        def to_local(self):
            return self.data

    p = FakeShardedDTensor(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match="lowrank"):
        SparseMFAC([p], compressor="lowrank").step()


# ------------------------------------------------------------------ extreme ratios
def _exact_solve(a, b):
    """a^-1 b in exact rational arithmetic (Gaussian elimination over Fractions)."""
    n = len(a)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        piv = next(r for r in range(c, n) if m[r][c] != 0)
        m[c], m[piv] = m[piv], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


def mfac_exact(rows, x, damp, norm):
    """(damp I + (1/norm) G^T G)^-1 x, exactly (rows and x are fp32/fp64 values)."""
    from fractions import Fraction

    G = [[Fraction(float(v)) for v in r] for r in rows]
    d = len(G[0])
    F = [[(Fraction(damp) if i == j else 0) + sum(r[i] * r[j] for r in G) / norm
          for j in range(d)] for i in range(d)]
    return torch.tensor([float(v) for v in _exact_solve(F, [Fraction(float(v)) for v in x])],
                        dtype=torch.float64)


@pytest.mark.parametrize("ratio", [1e12, 6e19])
def test_mfac_matches_exact_dense_formula_at_huge_gradient_to_damping_ratios(ratio):
    """|c|^2 / (n damp) huge: the Woodbury form's x/damp - G^T(...) cancelled (230x off at
    6e19); the coefficients n A^-1 e_slot do not. Rows overlap, one is tiny, one enormous."""
    d, m, damp = 12, 3, 0.1
    p = torch.nn.Parameter(torch.zeros(d))
    opt = SparseMFAC([p], lr=1.0, damp=damp, window_size=m, density=1.0, value_dtype="fp32")
    gen = torch.Generator().manual_seed(4)
    big = (ratio * m * damp) ** 0.5 / d ** 0.5
    history = []
    for scale in (big, 1.0, big * 1e-3, 1e-2):  # ring wraps at the 4th step
        g = torch.randn(d, generator=gen) * scale
        p.grad = g.clone()
        with torch.no_grad():
            p.zero_()
        opt.step()
        history.append(g.double())
        want = mfac_exact(history[-m:], g, damp, m)
        torch.testing.assert_close(-p.detach().double(), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("eps", [1e-8, 1e-5])
def test_ggt_small_singular_values_get_one_over_sigma_plus_eps(eps):
    """Orthogonal rows (disjoint supports): u = c / (|c| + eps) exactly. A row whose singular
    value fell under the old eigenvalue cut-off got the off-span step c / eps instead."""
    d, m = 30, 3
    p = torch.nn.Parameter(torch.zeros(d))
    opt = SparseGGT([p], lr=1.0, eps=eps, window_size=m, density=1.0, value_dtype="fp32")
    gen = torch.Generator().manual_seed(5)
    for t, scale in enumerate((1.0, 1e-7, 3e-8)):
        g = torch.zeros(d)
        g[10 * t:10 * t + 10] = torch.randn(10, generator=gen) * scale
        p.grad = g.clone()
        with torch.no_grad():
            p.zero_()
        opt.step()
        want = g.double() / (float(g.double().norm()) + eps)
        torch.testing.assert_close(-p.detach().double(), want, rtol=1e-5, atol=0)
    # and overlapping rows with a wide spread of singular values against the dense formula
    history = [r.double() for r in _window_rows(opt, [p], m)]
    g = torch.randn(d, generator=gen) * 1e-3
    p.grad = g.clone()
    with torch.no_grad():
        p.zero_()
    opt.step()
    history = history[1:] + [g.double()]
    want = ggt_dense(history, g, eps)
    torch.testing.assert_close(-p.detach().double(), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))
