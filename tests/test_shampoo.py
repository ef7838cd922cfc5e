"""4-bit Shampoo and its 32-bit baseline: the matrix functions, equivalence with AdamW/SGD while
preconditioning is off, the 32-bit root against a float64 eigh reference, the paper's Table 1
effect, memory layout, blocking/grafting, checkpoints and bad input."""

from __future__ import annotations

import io
import re
import math
import warnings

import pytest
import torch

from hf_compressed_optim import Shampoo, Shampoo32bit, optimizer_state_bytes
from hf_compressed_optim.kernels import codebook as C
import hf_compressed_optim.shampoo.optimizer as shampoo_mod
from hf_compressed_optim.shampoo.matrix_functions import (
    bjorck, compose, eigh_inverse_root, orthogonality_error, schur_newton_inverse_root,
)
from hf_compressed_optim.shampoo.blocks import param_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(seed=0, shapes=((40, 30), (30,), (8, 3, 3, 3), (1, 20), (70, 66))):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(p.dtype)
        opt.step()


def _tensors(state):
    return {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}


def _assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        if torch.is_tensor(v):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def _saved(opt, params):
    """What a checkpoint holds: the optimizer and parameters through torch.save and
    torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _full_run_and_checkpoint(make, grads, at=5):
    """(params, optimizer) trained on all ``grads``, and a second run's optimizer with its
    checkpoint after the first ``at``."""
    full_params, full = make()
    _run(full, full_params, grads)
    params, opt = make()
    _run(opt, params, grads[:at])
    return full_params, full, opt, _saved(opt, params)


def _resume(make, saved, grads):
    params, opt = make()
    with torch.no_grad():
        for p, s in zip(params, saved["params"]):
            p.copy_(s)
    opt.load_state_dict(saved["opt"])
    _run(opt, params, grads)
    return params, opt


# ---------------------------------------------------------------------- matrix functions
def test_bjorck_reduces_orthogonality_error_monotonically():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))
    codes, absmax = C.quantize_rows(q.float(), "linear2", 64)
    v = C.dequantize_rows(codes, absmax, 256, "linear2", 64).double()[None]
    errs = [float(orthogonality_error(v))]
    for _ in range(5):
        v = bjorck(v, 1)
        errs.append(float(orthogonality_error(v)))
    assert errs[0] > 1.0  # the quantized matrix is far from orthogonal
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0], errs
    # each singular value follows s <- 1.5 s - 0.5 s^3
    s = torch.linalg.svdvals(torch.diag(torch.tensor([0.5, 1.2, 1.6], dtype=torch.float64)))
    got = torch.linalg.svdvals(bjorck(torch.diag(s)[None], 1)[0])
    assert torch.allclose(got.sort().values, (1.5 * s - 0.5 * s ** 3).sort().values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_products_match_full_products(dtype):
    """sym_product / compose / bjorck multiply only the lower block triangle (plus one fused
    GEMM): exactly symmetric, equal to the plain products up to rounding; the QR refresh (padded
    for orders that are multiples of 512) equals the plain QR up to rounding."""
    from hf_compressed_optim.shampoo.matrix_functions import qr_subspace_refresh, sym_product
    g = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n in (50, 300):
        v = torch.randn(2, n, n, generator=g, dtype=dtype) / n ** 0.5
        s = torch.rand(2, n, generator=g, dtype=dtype)
        o = v @ v.mT
        full = (v.mT * s.unsqueeze(-2)) @ v
        for got, ref in ((sym_product(v, v.mT), o), (compose(v, s), full),
                         (compose(v, s, add=o.clone(), weight=0.9, add_weight=0.1),
                          0.9 * full + 0.1 * o)):
            assert torch.equal(got, got.mT)
            assert float((got - ref).abs().max() / ref.abs().max()) < tol
        ref = v
        for _ in range(2):
            ref = 1.5 * ref - 0.5 * (ref @ ref.mT) @ ref
        before = v.clone()
        assert float((bjorck(v, 2) - ref).abs().max()) < tol and torch.equal(v, before)
    q = torch.linalg.qr(torch.randn(1, 512, 512, generator=g, dtype=dtype))[0]
    a = (q * torch.logspace(-2, 0, 512, dtype=dtype)) @ q.mT
    u = torch.linalg.qr(torch.randn(1, 512, 512, generator=g, dtype=dtype))[0].mT
    lam, pt = qr_subspace_refresh(a, u)
    p_ref = torch.linalg.qr(a @ u.mT)[0]
    assert pt.is_contiguous()
    assert float((pt - p_ref.mT).abs().max()) < 1e3 * tol
    assert torch.allclose(lam, ((p_ref.mT @ a) * p_ref.mT).sum(-1), rtol=1e3 * tol, atol=0)


def test_schur_newton_matches_eigh_root():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 80, dtype=torch.float64)
    a = x @ x.mT
    ref = eigh_inverse_root(a, 1e-6)
    got = schur_newton_inverse_root(a, 1e-6, iters=100)
    assert float(torch.linalg.matrix_norm(got - ref).max() / torch.linalg.matrix_norm(ref).min()) \
        < 1e-5


# ---------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_before_start_step_equals_torch_adamw_exactly(wd):
    params = _params()
    ref = _clone(params)
    # statistics and roots ARE refreshed meanwhile (T1=1, T2=2), only not applied
    opt = Shampoo(params, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd,
                  stat_update_interval=1, root_update_interval=2, start_step=100,
                  min_quant_size=64)
    torch_opt = torch.optim.AdamW(ref, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd,
                                  foreach=False)
    grads = _grads(params, 6)
    _run(opt, params, grads)
    _run(torch_opt, ref, grads)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["exp_avg_sq"], torch_opt.state[r]["exp_avg_sq"])
    # the statistics were updated: eigenvalues are no longer the initial eps
    assert float(opt.state[params[0]]["eigvals"].max()) > 1e-3
    assert float(opt.state[params[4]]["eigvals"].max()) > 1e-3
    assert opt.state[params[4]]["root_diag"].std() > 0  # and the roots refreshed


@pytest.mark.parametrize("nesterov", [False, True])
def test_before_first_root_refresh_equals_torch_sgd_exactly(nesterov):
    params = _params()
    ref = _clone(params)
    opt = Shampoo(params, lr=0.05, first_order="sgd", momentum=0.9, nesterov=nesterov,
                  weight_decay=1e-2, stat_update_interval=2, root_update_interval=50)
    torch_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, nesterov=nesterov,
                                weight_decay=1e-2, foreach=False)
    grads = _grads(params, 5)
    _run(opt, params, grads)
    _run(torch_opt, ref, grads)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)


def test_one_dimensional_params_stay_plain_adamw_after_preconditioning():
    params = _params(shapes=((30,), (1, 1, 7), (24, 20)))
    ref = _clone(params)
    opt = Shampoo(params, lr=1e-2, stat_update_interval=1, root_update_interval=2)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0, foreach=False)
    grads = _grads(params, 5)
    _run(opt, params, grads)
    _run(torch_opt, ref, grads)
    assert torch.equal(params[0], ref[0]) and torch.equal(params[1], ref[1])
    assert not torch.allclose(params[2], ref[2])  # the matrix was preconditioned
    assert "layout" not in opt.state[params[0]] and "layout" in opt.state[params[2]]


# ---------------------------------------------------------------------- 32-bit root
@pytest.mark.parametrize("inverse_root,rtol", [("eigen", 1e-5), ("schur_newton", 2e-2)])
def test_32bit_inverse_root_matches_float64_eigh(inverse_root, rtol):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(40, 30))
    beta, eps, steps = 0.9, 1e-6, 6
    opt = Shampoo32bit([p], lr=0.0, stat_update_interval=1, root_update_interval=steps,
                       stat_decay=beta, matrix_eps=eps, inverse_root=inverse_root)
    left = eps * torch.eye(40, dtype=torch.float64)
    right = eps * torch.eye(30, dtype=torch.float64)
    mix = torch.randn(40, 40, dtype=torch.float64)
    for _ in range(steps):
        g = (mix @ torch.randn(40, 30, dtype=torch.float64))
        p.grad = g.float()
        g = p.grad.double()
        left = beta * left + (1 - beta) * g @ g.T
        right = beta * right + (1 - beta) * g.T @ g
        opt.step()
    state = opt.state[p]
    assert opt.param_groups[0]["precond_bits"] == 32
    for k, (ref_stat, n, off) in enumerate(((left, 40, 0), (right, 30, 1600))):
        stat = state["stat_fp32"][off:off + n * n].view(n, n)
        assert torch.allclose(stat.double(), ref_stat, rtol=1e-5, atol=1e-6 * float(ref_stat.max()))
        # the root of the stored fp32 statistic (float64 eigh); fp32 Schur–Newton is less exact
        lam, q = torch.linalg.eigh(stat.double())
        ref_root = q @ torch.diag((lam.clamp_min(0) + eps * lam.max()) ** -0.25) @ q.T
        root = state["root_fp32"][off:off + n * n].view(n, n).double()
        assert float(torch.linalg.norm(root - ref_root) / torch.linalg.norm(ref_root)) < rtol


def test_4bit_root_tracks_32bit_root():
    torch.manual_seed(0)
    m, n = 80, 64
    # well-conditioned statistics (condition number 100); see README for ill-conditioned ones
    mix_l = torch.linalg.qr(torch.randn(m, m))[0] * torch.logspace(-0.5, 0.5, m)
    mix_r = torch.linalg.qr(torch.randn(n, n))[0] * torch.logspace(-0.5, 0.5, n)
    p4, p32 = torch.nn.Parameter(torch.zeros(m, n)), torch.nn.Parameter(torch.zeros(m, n))
    kw = dict(lr=0.0, stat_update_interval=1, root_update_interval=20, stat_decay=0.9)
    o4, o32 = Shampoo([p4], **kw), Shampoo([p32], precond_bits=32, **kw)
    for _ in range(20):
        p4.grad = mix_l @ torch.randn(m, n) @ mix_r
        p32.grad = p4.grad.clone()
        o4.step()
        o32.step()
    s4, s32 = o4.state[p4], o32.state[p32]
    assert s4["eigvec_codes"].dtype == torch.uint8 and s4["stat_fp32"].numel() == 0
    root32 = s32["root_fp32"][:m * m].view(m, m)
    root4 = C.dequantize_offdiag(s4["root_diag"][:m], s4["root_codes"][:m * m // 2].view(m, m // 2),
                                 s4["root_absmax"][:2 * m].view(m, 2), "linear2", 64)
    nre = float(torch.linalg.norm(root4 - root32) / torch.linalg.norm(root32))
    assert nre < 0.2, nre


# ---------------------------------------------------------------------- paper Table 1
PAPER_TABLE1_A2 = {  # synthetic A2, (NRE, angle error in degrees)
    ("linear2", "A"): (0.4465, 15.338), ("linear2", "U"): (0.0942, 5.3998),
    ("linear2", "U+OR"): (0.0669, 3.8166),
    ("dynamic_tree", "A"): (0.4615, 17.189), ("dynamic_tree", "U"): (0.1224, 7.0144),
    ("dynamic_tree", "U+OR"): (0.0878, 4.9960),
}


def table1_errors(name: str, n: int = 1200, block: int = 64, eps: float = 1e-6, seed: int = 0):
    """Errors of A^(-1/4) for a synthetic PD matrix A = U diag(λ) Uᵀ (λ = r⁴, r ~ U(0, 1)) when
    A itself is 4-bit quantized (diagonal split) vs when its eigenvector matrix is quantized,
    without and with 4 Björck rectification steps. Returns {what: (NRE, angle in degrees)}."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    u = q.T
    lam = torch.rand(n, generator=g, dtype=torch.float64) ** 4

    def root(uu, ll):
        return compose(uu[None], (ll.clamp_min(0) + eps * ll.max()).pow(-0.25)[None])[0]

    exact = root(u, lam)

    def err(x):
        nre = float(torch.linalg.norm(x - exact) / torch.linalg.norm(exact))
        cos = float((x * exact).sum() / (torch.linalg.norm(x) * torch.linalg.norm(exact)))
        return nre, math.degrees(math.acos(max(-1.0, min(1.0, cos))))

    a = compose(u[None], lam[None])[0]
    aq = C.dequantize_offdiag(*C.quantize_offdiag(a.float(), name, block), name, block).double()
    uq = C.dequantize_rows(*C.quantize_rows(u.float(), name, block), n, name, block).double()
    return {"A": err(eigh_inverse_root(aq[None], eps)[0]), "U": err(root(uq, lam)),
            "U+OR": err(root(bjorck(uq[None], 4)[0], lam))}


def test_paper_table1_quantizing_eigenvectors_beats_quantizing_the_matrix(capsys):
    errs = table1_errors("linear2")
    with capsys.disabled():
        print("\nTable 1 (order 1200, block 64, Linear-2, synthetic): ours vs paper's A2")
        for what, (nre, ae) in errs.items():
            pn, pa = PAPER_TABLE1_A2[("linear2", what)]
            print(f"  QM={what:5s} NRE {nre:.4f} (paper {pn:.4f})   AE {ae:7.3f} deg "
                  f"(paper {pa:.3f})")
    assert errs["A"][0] > 3 * errs["U"][0], errs
    assert errs["A"][1] > 3 * errs["U"][1], errs
    assert errs["U+OR"][0] < errs["U"][0] and errs["U+OR"][1] < errs["U"][1], errs


# ---------------------------------------------------------------------- memory and layout
def test_state_bytes_follow_paper_formula_and_beat_32bit_by_6x():
    n = 256
    p4, p32 = torch.nn.Parameter(torch.randn(n, n)), torch.nn.Parameter(torch.randn(n, n))
    o4, o32 = Shampoo([p4]), Shampoo32bit([p32])
    for p, o in ((p4, o4), (p32, o32)):
        p.grad = torch.randn(n, n)
        o.step()
    b4 = optimizer_state_bytes(o4)
    b32 = optimizer_state_bytes(o32)
    per_factor = n * n + 8 * n * math.ceil(n / 64) + 8 * n  # = 1.125 n^2 + 8n when 64 | n
    assert per_factor == 1.125 * n * n + 8 * n
    assert b4["preconditioner"] == 2 * per_factor
    assert b32["preconditioner"] == 2 * 8 * n * n
    assert b32["preconditioner"] / b4["preconditioner"] > 6
    assert b4["first_order"] == b32["first_order"] == 2 * 4 * n * n
    assert set(b4) == {"total", "preconditioner", "first_order", "counters"}


@pytest.mark.parametrize("first_order,per_param", [("adamw", 8.0), ("adamw_8bit", 2 + 8 / 256),
                                                   ("adamw_4bit", 1 + 8 / 128)])
def test_grafting_state_bytes_of_low_bit_adamw(first_order, per_param):
    """AdamW's two moments: fp32 (8 B/param), 8-bit codes + an fp32 absmax per 256 elements, or
    4-bit codes + one per 128; tensors under lowbit_min_size keep fp32 moments."""
    big, small = torch.nn.Parameter(torch.randn(128, 256)), torch.nn.Parameter(torch.randn(60, 60))
    opt = Shampoo([big, small], first_order=first_order)
    for p in (big, small):
        p.grad = torch.randn(p.shape)
    opt.step()
    assert optimizer_state_bytes(opt)["first_order"] == per_param * big.numel() + 8 * small.numel()
    assert "exp_avg" in opt.state[small]


@pytest.mark.parametrize("first_order", ["adamw_8bit", "adamw_4bit"])
def test_low_bit_grafting_stays_finite_on_huge_gradients(first_order):
    """Gradients whose squares overflow fp32 (v is clamped to the fp32 maximum before it is
    quantized): parameters and codes stay finite, as with fp32 moments."""
    params = _params(shapes=((64, 64),))
    opt = Shampoo(params, lr=1e-2, first_order=first_order, stat_update_interval=1,
                  root_update_interval=2)
    for t, scale in enumerate([1.0, 1.0, 1e20, 1e30, 1e30], 1):
        _run(opt, params, [[g * scale for g in gs] for gs in _grads(params, 1, seed=t)])
        assert bool(torch.isfinite(params[0]).all()), t
    state = opt.state[params[0]]
    assert bool(torch.isfinite(state["exp_avg_absmax"]).all())
    assert bool(torch.isfinite(state["exp_avg_sq_absmax"]).all())


def test_blocking_partitions_and_small_factors_stay_fp32():
    lay = param_layout((2600, 70), 1200, 4, 4096, 64)
    assert [b.shape for b in lay.blocks] == [(1200, 70), (1200, 70), (200, 70)]
    assert all(b.left.quantized and b.right.quantized for b in lay.blocks)
    lay = param_layout((8, 3, 3, 3), 1200, 4, 4096, 64)
    assert lay.matrix_shape == (8, 27) and not lay.blocks[0].left.quantized
    assert param_layout((1, 5, 1), 1200, 4, 4096, 64) is None
    lay = param_layout((130, 70), 64, 4, 4096, 64)
    cells = torch.zeros(130, 70)
    for b in lay.blocks:
        cells[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += 1
    assert torch.equal(cells, torch.ones(130, 70))


def test_blocked_preconditioning_and_grafting_norm():
    """SGD without momentum and lr=1: the step is the grafted direction, whose norm is ‖G‖;
    it equals L̂ G R̂ per block computed by hand from the fp32 roots."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 45))
    opt = Shampoo32bit([p], lr=1.0, first_order="sgd", momentum=0.0, max_order=32,
                       stat_update_interval=1, root_update_interval=2)
    for _ in range(2):
        p.grad = torch.randn(50, 45)
        before = p.detach().clone()
        opt.step()
    step = before - p.detach()
    assert float(torch.linalg.norm(step)) == pytest.approx(float(torch.linalg.norm(p.grad)),
                                                          rel=1e-5)
    state, lay = opt.state[p], param_layout((50, 45), 32, 32, 4096, 64)
    manual = torch.empty(50, 45)
    for b in lay.blocks:
        left = b.left.slice(state["root_fp32"], 1).view(b.left.order, -1)
        right = b.right.slice(state["root_fp32"], 1).view(b.right.order, -1)
        manual[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = \
            left @ p.grad[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] @ right
    manual *= torch.linalg.norm(p.grad) / torch.linalg.norm(manual)
    assert torch.allclose(step, manual, rtol=1e-4, atol=1e-5)


def test_batched_equal_shapes_match_separate_optimizers():
    params = _params(shapes=((64, 96), (64, 96), (96, 64)))
    separate = _clone(params)
    kw = dict(lr=1e-2, stat_update_interval=1, root_update_interval=2)
    opt = Shampoo(params, **kw)
    singles = [Shampoo([p], **kw) for p in separate]
    grads = _grads(params, 4)
    _run(opt, params, grads)
    for k, (o, p) in enumerate(zip(singles, separate)):
        _run(o, [p], [[gs[k]] for gs in grads])
    for p, q in zip(params, separate):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- checkpoints, dtypes
@pytest.mark.parametrize("first_order", ["adamw", "adamw_8bit", "adamw_4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_resume_exact_with_weights_only(dtype, first_order):
    def make():
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
        return params, Shampoo(params, lr=1e-2, stat_update_interval=2, root_update_interval=3,
                               min_quant_size=64, first_order=first_order)

    grads = _grads(_params(), 10)
    full_params, full, opt, saved = _full_run_and_checkpoint(make, grads)
    assert saved["opt"]["state"][4]["eigvec_codes"].dtype == torch.uint8
    assert saved["opt"]["state"][4]["codebook"] == "linear2"
    params2, opt2 = _resume(make, saved, [])
    for s_old, s_new in zip(opt.state.values(), opt2.state.values()):
        _assert_same_state(s_new, s_old)
    _run(opt2, params2, grads[5:])
    for p, q in zip(params2, full_params):
        assert p.dtype == dtype and torch.equal(p, q)
    for s_full, s_res in zip(full.state.values(), opt2.state.values()):
        _assert_same_state(s_res, s_full)
    if first_order == "adamw":
        assert opt2.state[params2[0]]["exp_avg"].dtype == dtype  # first-order state: param dtype
    else:  # the (70, 66) parameter has quantized moments: uint8 codes and fp32 scales kept
        big = opt2.state[params2[4]]
        assert "exp_avg" not in big and big["exp_avg_sq_codes"].dtype == torch.uint8
        assert big["exp_avg_absmax"].dtype == torch.float32
        assert opt2.state[params2[0]]["exp_avg"].dtype == dtype  # (40, 30): below 4096


def _make_quantized(codebook):
    params = _params()
    return params, Shampoo(params, lr=1e-2, stat_update_interval=2, root_update_interval=3,
                           min_quant_size=64, codebook=codebook)


def _reorder_codebooks(monkeypatch):
    """A later release that lists (or extends) the codebooks in another order."""
    monkeypatch.setattr(C, "CODEBOOKS", tuple(reversed(C.CODEBOOKS)))


@pytest.mark.parametrize("reordered", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("codebook", ["linear2", "dynamic_tree"])
def test_checkpoint_keeps_its_codebook(monkeypatch, codebook, legacy, reordered):
    """The codebook is stored by name, so a later release that lists (or extends) CODEBOOKS in
    another order resumes exactly. ``legacy``: checkpoints written before state["codebook"]
    existed (layout = geometry + an index into the frozen order ("linear2", "dynamic_tree"))."""
    def make():
        return _make_quantized(codebook)

    grads = _grads(_params(), 10)
    full_params, full, _, saved = _full_run_and_checkpoint(make, grads)
    legacy_index = {"linear2": 0, "dynamic_tree": 1}[codebook]
    if legacy:
        for state in saved["opt"]["state"].values():
            if "layout" in state:
                state.pop("codebook", None)
                state["layout"] = torch.cat((state["layout"][:4], torch.tensor([legacy_index])))
    if reordered:
        _reorder_codebooks(monkeypatch)
    params2, opt2 = _resume(make, saved, grads[5:])
    for p, q in zip(params2, full_params):
        assert torch.equal(p, q)
    for s_full, s_res in zip(full.state.values(), opt2.state.values()):
        if legacy and "layout" in s_full:
            assert "codebook" not in s_res
            assert s_res["layout"].tolist() == s_full["layout"].tolist()[:4] + [legacy_index]
            s_full = {k: v for k, v in s_full.items() if k not in ("layout", "codebook")}
            s_res = {k: v for k, v in s_res.items() if k != "layout"}
        _assert_same_state(s_res, s_full)


def test_empty_groups_zero_numel_no_grad_and_template_step():
    a = torch.nn.Parameter(torch.randn(10, 12))
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    nograd = torch.nn.Parameter(torch.randn(4, 4))
    opt = Shampoo([{"params": [a, empty, nograd]}, {"params": []}], lr=0.0)
    a.grad = torch.zeros_like(a)
    empty.grad = torch.zeros_like(empty)
    before = a.detach().clone()
    opt.step()  # template step: lr=0, zero grads -> state created, nothing else
    assert torch.equal(a, before) and int(opt.state[a]["step"]) == 0
    assert nograd not in opt.state
    opt.param_groups[0]["lr"] = torch.tensor(0.1)  # tensor lr
    a.grad = torch.randn_like(a)
    opt.step()
    assert int(opt.state[a]["step"]) == 1 and not torch.equal(a, before)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,name", [
    ({"lr": -1}, "lr"), ({"precond_bits": 8}, "precond_bits"),
    ({"stat_update_interval": -1}, "stat_update_interval"),  # 0: automatic
    ({"root_update_interval": 1.5}, "root_update_interval"), ({"stat_decay": 1.5}, "stat_decay"),
    ({"matrix_eps": 0.0}, "matrix_eps"), ({"max_order": 0}, "max_order"),
    ({"quant_block_size": 63}, "quant_block_size"), ({"min_quant_size": -1}, "min_quant_size"),
    ({"codebook": "nf4"}, "codebook"), ({"rectify_iters": (1,)}, "rectify_iters"),
    ({"rectify_iters": (1, -2)}, "rectify_iters[1]"), ({"inverse_root": "newton"}, "inverse_root"),
    ({"start_step": 0}, "start_step"), ({"first_order": "adam"}, "first_order"),
    ({"momentum": 1.0}, "momentum"), ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"betas": (0.9, 1.0)}, "betas[1]"), ({"eps": 0}, "eps"), ({"nonfinite": "ignore"}, "nonfinite"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match="^" + re.escape(name)):
        Shampoo([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    with pytest.raises(ValueError, match="precond_bits"):
        Shampoo32bit([torch.nn.Parameter(torch.zeros(2))], precond_bits=4)


@pytest.mark.parametrize("bad,first_order", [(float("nan"), "adamw"), (float("inf"), "adamw"),
                                             (float("nan"), "adamw_4bit")])
def test_nonfinite_gradient_never_reaches_statistics(bad, first_order):
    params = _params(shapes=((70, 66), (20, 10)))
    opt = Shampoo(params, lr=1e-2, stat_update_interval=1, root_update_interval=1,
                  first_order=first_order)
    _run(opt, params, _grads(params, 2))
    snapshot = _tensors(opt.state[params[0]])
    before = params[0].detach().clone()
    g = torch.randn(70, 66)
    g[3, 4] = bad
    params[0].grad = g
    params[1].grad = torch.randn(20, 10)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(params[0], before)
    for k, v in _tensors(opt.state[params[0]]).items():
        if k != "nonfinite_skips":
            assert torch.equal(v, snapshot[k]), k
    assert opt.nonfinite_skips == 1 and int(opt.state[params[1]]["step"]) == 3


@pytest.mark.parametrize("bits", [4, 32])
@pytest.mark.parametrize("first_order", ["adamw", "sgd"])
@pytest.mark.parametrize("ordinary_steps", [3, 0])
def test_huge_finite_gradients_keep_parameters_finite(bits, first_order, ordinary_steps):
    """Finite gradients whose norm overflows an fp32 sum of squares (‖G‖ > 1.8e19) while
    preconditioning is on, with statistics built from ordinary gradients first or not: the
    parameters stay finite, as torch's AdamW / SGD keep them on the same gradients."""
    params = _params(shapes=((24, 16), (16,)))
    ref = _clone(params)
    kw = dict(lr=1e-2, weight_decay=1e-2)
    opt = Shampoo(params, first_order=first_order, precond_bits=bits, stat_update_interval=1,
                  root_update_interval=2, min_quant_size=64, **kw)
    torch_opt = torch.optim.AdamW(ref, **kw) if first_order == "adamw" else \
        torch.optim.SGD(ref, momentum=0.9, **kw)
    scales = [1.0] * ordinary_steps + [1e20] * 3 + [1e30] * 3
    grads = _grads(params, len(scales))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the statistics updates overflow: previous ones kept
        for t, (gs, scale) in enumerate(zip(grads, scales), 1):
            huge = [[g * scale for g in gs]]
            _run(opt, params, huge)
            _run(torch_opt, ref, huge)
            assert all(bool(torch.isfinite(p).all()) for p in ref), (t, scale)  # baseline
            assert all(bool(torch.isfinite(p).all()) for p in params), (t, scale)
    state = opt.state[params[0]]
    assert int(state["step"]) == len(scales)  # every step taken, none skipped
    assert bool(torch.isfinite(state["exp_avg" if first_order == "adamw" else
                                     "momentum_buffer"]).all())
    # the grafted preconditioned direction itself was finite: no raw-gradient fallback
    assert not any("raw gradient" in str(w.message) for w in caught)


@pytest.mark.parametrize("bits", [4, 32])
def test_overflowing_preconditioned_gradient_falls_back_to_raw_gradient(bits):
    """Statistics of small gradients give large inverse roots, so L̂ G R̂ of a gradient with one
    entry near the fp32 maximum overflows: that parameter steps on its raw gradient instead."""
    params = _params(shapes=((24, 16), (20, 10)))
    opt = Shampoo(params, lr=1.0, first_order="sgd", momentum=0.0, precond_bits=bits,
                  stat_update_interval=1, root_update_interval=2, min_quant_size=64)
    _run(opt, params, [[g * 1e-3 for g in gs] for gs in _grads(params, 4)])
    huge, ordinary = _grads(params, 1, seed=7)[0]
    huge[3, 5] = 1e38
    before = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="raw gradient is used for this step"):
        _run(opt, params, [[huge, ordinary]])
    assert torch.equal(params[0], before[0] - huge)
    assert not torch.allclose(params[1], before[1] - ordinary)  # still preconditioned
    assert all(bool(torch.isfinite(p).all()) for p in params)
    failures = [int(opt.state[p]["precond_failures"]) for p in params]
    assert failures[0] > failures[1]


def test_failed_eigen_and_root_steps_keep_previous_preconditioner(monkeypatch):
    params = _params(shapes=((70, 66), (20, 10)))
    opt = Shampoo(params, lr=1e-2, stat_update_interval=1, root_update_interval=2)
    _run(opt, params, _grads(params, 2))
    quant = _tensors(opt.state[params[0]])
    fp32 = _tensors(opt.state[params[1]])

    def nan_qr(a, u):
        return torch.full_like(a[..., 0], float("nan")), torch.full_like(a, float("nan"))

    def broken_eigh(a, eps):
        raise RuntimeError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(shampoo_mod, "qr_subspace_refresh", nan_qr)
    monkeypatch.setattr(shampoo_mod, "eigh_inverse_root", broken_eigh)
    monkeypatch.setattr(shampoo_mod, "eigen_inverse_root",
                        lambda u, s, eps: torch.full_like(u, float("inf")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(opt, params, _grads(params, 4, seed=5))
    msgs = [str(w.message) for w in caught if "previous preconditioner" in str(w.message)]
    # one warning per kind of failure (eigenvector update, inverse root), not one per step
    assert len(msgs) == 2, msgs
    assert "QR" in msgs[0] and "inverse-root" in msgs[1]
    for k in ("eigvec_codes", "eigvec_absmax", "eigvals", "root_diag", "root_codes"):
        assert torch.equal(opt.state[params[0]][k], quant[k]), k
    assert torch.equal(opt.state[params[1]]["root_fp32"], fp32["root_fp32"])
    assert int(opt.state[params[0]]["precond_failures"]) > 0
    assert all(torch.isfinite(p).all() for p in params)


def test_triton_backend_gives_the_same_step(monkeypatch):
    pytest.importorskip("triton")
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HCO_KERNEL_BACKEND", backend)
        params = _params(shapes=((64, 20),))  # one quantized factor keeps the interpreter fast
        opt = Shampoo(params, lr=1e-2, stat_update_interval=1, root_update_interval=2,
                      quant_block_size=32)
        _run(opt, params, _grads(params, 2))
        results.append((params[0].detach().clone(), opt.state[params[0]]["root_codes"].clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_sym_product_one_gemm_branch_matches_panels(monkeypatch):
    """The accelerator branch of sym_product (one GEMM, then the lower triangle mirrored) gives
    the panelled CPU result up to rounding, exactly symmetric, with and without ``add``."""
    from hf_compressed_optim.shampoo import matrix_functions as MF

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 300, 40, generator=g, dtype=torch.float64)
    add = MF.symmetrize(torch.randn(2, 300, 300, generator=g, dtype=torch.float64))
    want = [MF.sym_product(a, a.mT), MF.sym_product(a, a.mT, add=add, alpha=0.3, beta=0.7)]
    monkeypatch.setattr(MF, "panelled", lambda device: False)
    got = [MF.sym_product(a, a.mT), MF.sym_product(a, a.mT, add=add, alpha=0.3, beta=0.7)]
    for w, o in zip(want, got):
        assert torch.equal(o, o.mT)
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)
