"""One kernel-dispatch policy for every op: a forced backend that cannot run raises one clear
error (op, device, alternative); automatic selection falls back to the PyTorch twins quietly."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import hf_compressed_optim as hco
from hf_compressed_optim.kernels import dispatch as K


def _optimizers():
    """One optimizer per kernel family: MicroAdam, EFCP's sparse rows, Shampoo's codebook."""
    return {
        "MicroAdam": lambda ps: hco.MicroAdam(ps, lr=1e-3, density=0.1),
        "SparseMFAC": lambda ps: hco.SparseMFAC(ps, lr=1e-4, window_size=4, density=0.1),
        "Shampoo": lambda ps: hco.Shampoo(ps, lr=1e-3, stat_update_interval=1,
                                         root_update_interval=1, min_quant_size=0),
    }


def _step_twice(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(96, 80)), torch.nn.Parameter(torch.randn(33))]
    opt = make(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params


@pytest.mark.skipif(not K.triton_available(),
                    reason="needs triton installed (without it: the test below)")
@pytest.mark.parametrize("name", list(_optimizers()))
def test_forced_triton_on_cpu_without_interpreter_raises_clear_error(name, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at dispatch time
    with pytest.raises(K.KernelBackendError) as info:
        _step_twice(_optimizers()[name])
    msg = str(info.value)
    assert "HCO_KERNEL_BACKEND=triton" in msg and "cpu tensor" in msg
    assert "TRITON_INTERPRET=1" in msg and "'torch'" in msg
    assert "the Triton kernel for " in msg  # names the op


@pytest.mark.parametrize("name", list(_optimizers()))
def test_forced_triton_without_triton_raises_and_auto_falls_back_quietly(name, monkeypatch):
    monkeypatch.setattr(K._triton, "UNAVAILABLE", "ImportError: No module named 'triton'")
    monkeypatch.setenv(K.ENV_VAR, "triton")
    with pytest.raises(K.KernelBackendError, match="triton could not be imported"):
        _step_twice(_optimizers()[name])
    monkeypatch.setenv(K.ENV_VAR, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = _step_twice(_optimizers()[name])
    assert all(torch.isfinite(p).all() for p in params)


def test_every_family_imports_and_steps_without_triton():
    """No triton at all (CPU, macOS): the package imports, auto uses the twins, forced raises."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import os, torch\n"
            "from hf_compressed_optim.kernels import dispatch as K\n"
            "import test_kernel_dispatch as t\n"
            "assert not K.triton_available()\n"
            "for name, make in t._optimizers().items():\n"
            "    assert all(torch.isfinite(p).all() for p in t._step_twice(make)), name\n"
            "os.environ[K.ENV_VAR] = 'triton'\n"
            "try:\n"
            "    K.block_topk(torch.ones(8), K.TopKLayout.create(8, 8, 0.5))\n"
            "except K.KernelBackendError as err:\n"
            "    assert 'triton could not be imported' in str(err)\n"
            "else:\n"
            "    raise AssertionError('forced triton without triton did not raise')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]


def test_each_op_names_itself(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layout = K.TopKLayout.create(100, 64, 0.1)
    x = torch.randn(100)
    with pytest.raises(K.KernelBackendError, match="kernel for block_topk "):
        K.block_topk(x, layout)
    idx = torch.zeros(2, layout.k, dtype=torch.int16)
    with pytest.raises(K.KernelBackendError, match="kernel for sparse_rows_dot "):
        K.sparse_rows_dot(idx, torch.zeros(2, layout.k), layout, x)
    with pytest.raises(K.KernelBackendError, match="kernel for codebook_quantize_rows "):
        K.codebook_quantize_rows(torch.eye(8), "linear2", 64)


def test_bad_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="HCO_KERNEL_BACKEND must be one of"):
        K.backend_for(torch.zeros(1))


def test_repo_kernels_dir_does_not_shadow_an_installed_kernels_package(tmp_path):
    """From the repository root ``import kernels`` finds an installed regular package of that
    name (Hugging Face's ``kernels``): the repo's ``kernels/`` is a namespace directory, shipped
    only as ``hf_compressed_optim.kernels`` (which every other test imports)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'installed kernels'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), root]))
    run = dict(capture_output=True, text=True, timeout=120, env=env)
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.MARKER)"],
                         cwd=root, **run)
    assert out.returncode == 0 and out.stdout.strip() == "installed kernels", out.stderr[-2000:]
