"""What every benchmark shares: the one LLaMA builder, parameter sets, timing, machine info,
the peers' import path and the fresh child processes that measure peak memory."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 256

#: name -> (hidden, layers, intermediate, heads, kv_heads)
LLAMA_SIZES = {
    "xs": (32, 1, 88, 2, 1),
    "s": (128, 2, 352, 4, 2),
    "m": (256, 4, 704, 4, 2),
    "l": (512, 4, 1376, 8, 4),
    "xl": (768, 6, 2048, 12, 4),
}


# ------------------------------------------------------------------ models and parameters
def build_llama(size: str | tuple[int, int, int, int, int], seed: int = 0,
                device: str | torch.device = "cpu", *, vocab: int = VOCAB, tie: bool = False,
                max_positions: int = 256) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM``: ``size`` is a :data:`LLAMA_SIZES` name or a
    (hidden, layers, intermediate, heads, kv_heads) tuple; ``seed`` fixes the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv = LLAMA_SIZES[size] if isinstance(size, str) else size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device)


def llama_param_count(size: str) -> int:
    """Parameters of LLaMA ``size`` (built on the meta device: no memory)."""
    return sum(p.numel() for p in build_llama(size, 0, "meta").parameters())


def llama_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int,
                 parts: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "norm",
                                           "norm"), layers: int = 1,
                 final_norm: bool = False) -> list[tuple[int, ...]]:
    """Weight shapes of ``layers`` LLaMA decoder layers (nn.Linear weights are [out, in]):
    the named ``parts`` of each layer, optionally followed by the final RMSNorm."""
    kv = kv_heads * (hidden // heads)
    table = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
             "gate": (intermediate, hidden), "up": (intermediate, hidden),
             "down": (hidden, intermediate), "norm": (hidden,)}
    return [table[p] for p in parts] * layers + ([(hidden,)] if final_norm else [])


#: TinyLlama-1.1B's layer dimensions (hidden 2048, MLP 5632, 32 heads, 4 KV heads).
TINYLLAMA = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4)


def make_params(shapes: list[tuple[int, ...]], device: str | torch.device,
                seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 parameters of the given shapes with fixed random gradients (LLaMA-like scales)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


# ------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds of one ``opt.step()``: CUDA events after a synchronize, else wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        opt.step()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ environment
def add_peers_path(path: str | None) -> None:
    """Make a ``pip install --target`` directory (bitsandbytes, torchao) importable by this
    process only: in site-packages the peers would change what ``import transformers`` loads
    for everyone. The one place the benchmarks touch the import path."""
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)


def peer_versions() -> dict[str, str]:
    """Version of each peer library, or why it is unavailable."""
    out = {}
    for mod in ("bitsandbytes", "torchao"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[mod] = __import__(mod).__version__
        except Exception as err:  # not installed, or fails to import on this machine
            out[mod] = f"unavailable ({type(err).__name__})"
    return out


def machine_info() -> dict:
    """CPU model, core and thread counts, platform, Python and torch (and the GPU, if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   timeout=10).stdout.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    """Installed versions of the libraries measured, and the commit (with any uncommitted
    changes to the package) that was measured."""
    import importlib.metadata as md

    out = {}
    for dist in ("hf-compressed-optim", "torch", "transformers", "accelerate", "triton",
                 "scikit-learn", "bitsandbytes", "torchao"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            if dist in sys.modules:  # a peer imported from --peers-path (no dist metadata)
                out[dist] = getattr(sys.modules[dist], "__version__", "?")
    git = ["git", "-C", REPO]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if commit:
            out["git"] = commit
            dirty = subprocess.run(git + ["status", "--porcelain", "--", "kernels",
                                          "hf_compressed_optim"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            out["git_dirty_paths"] = [line[3:] for line in dirty.splitlines()]
    except Exception:
        pass
    return out


def write_json(obj, path: str | None, indent: int = 1) -> None:
    """Write ``obj`` to ``path`` (creating its folder); nothing when ``path`` is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=indent)


def print_saved(path: str, render) -> dict:
    """``--from-json``: print ``render`` of the results saved at ``path`` and return them."""
    with open(path) as f:
        res = json.load(f)
    print(render(res))
    return res


# ------------------------------------------------------------------ child processes
CHILD_MARKER = "BENCH_CHILD_RESULT "


def start_child(module: str, args: list[str], peers_path: str | None = None,
                extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m module args`` in a fresh process from the repository root (peak memory of
    one optimizer without the others' allocator caches); the peers on its import path."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(extra_env or {}))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if peers_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [peers_path, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def child_result(proc: subprocess.Popen) -> dict:
    """The dict a child printed with :func:`report_to_parent`, or ``{"error": last line}``."""
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    tail = (err or out).strip().splitlines()
    return dict(error=(tail[-1] if tail else f"exit {proc.returncode}")[:300])


def report_to_parent(result: dict) -> dict:
    """Print ``result`` on the line :func:`child_result` looks for."""
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return result


def md_table(header: list[str], align: str, rows) -> list[str]:
    """Lines of a Markdown table; ``align`` has one letter per column, ``l`` or ``r``; a row
    that is a dict with an ``error`` (a measurement that failed) reads ``failed: ...``."""
    def cells(row):
        if isinstance(row, tuple) and isinstance(row[1], dict) and "error" in row[1]:
            return [row[0], f"failed: {row[1]['error'][:80]}"] + [""] * (len(header) - 2)
        return row

    return (["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
            + ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows])


def add_options(parser: argparse.ArgumentParser, options: dict) -> None:
    """``parser.add_argument(flag, type=type(default), default=default)`` for each entry."""
    for flag, default in options.items():
        parser.add_argument(flag, type=type(default), default=default)
