"""The models and the real, offline data every optimizer is measured on.

* **text**: a LLaMA-architecture causal LM (transformers' ``LlamaForCausalLM``) trained from
  scratch on ``hf_compressed_optim.offline_corpus`` (English docstrings of the Python standard
  library, byte tokens). Sizes ``xs`` … ``xl`` span 0.1M to 39M parameters.
* **finetune**: the ``text`` model pretrained with AdamW on most of the corpus, then fine-tuned
  on a held-out part of it (networking, e-mail and markup docstrings): the regime the package is
  for.
* **digits**: a small CNN classifying scikit-learn's bundled handwritten-digits images (1797 real
  8x8 scans from UCI, shipped inside the scikit-learn wheel, so no download).

Data splits are fixed (split seed 0) for every run; a run's seed changes the model
initialisation and the batch order only. The learning rate is chosen on ``val``, the reported
figures are on ``test``. For ``finetune`` every run starts from the same pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import LLAMA_SIZES, build_llama

class DigitsCNN(torch.nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers (151k parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor | None = None   # None for language modelling (targets are the inputs)


class Task:
    """A model family, its data splits and its loss; subclasses fill in the specifics."""

    name = ""
    metric = "loss"

    def __init__(self, splits: dict[str, Split], batch: int, device):
        self.splits, self.batch, self.device = splits, batch, torch.device(device)

    def batches(self, steps: int, seed: int):
        """``steps`` index tensors into the train split: seeded epochs of a random permutation."""
        n = len(self.splits["train"].x)
        gen = torch.Generator().manual_seed(10_000 + seed)
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < self.batch:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:self.batch], order[self.batch:]
            yield idx

    def loss(self, model, split: str, idx=None):
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        raise NotImplementedError


#: The fine-tuning domain: docstrings of the networking, e-mail and markup modules. The base model
#: is pretrained on the rest of the corpus, so fine-tuning meets text it has not seen.
FINETUNE_MODULES = (
    "base64", "email", "ftplib", "html", "html.parser", "http.client", "http.cookies", "imaplib",
    "ipaddress", "mailbox", "mimetypes", "poplib", "quopri", "selectors", "smtplib", "socket",
    "urllib.parse", "urllib.request", "xml.dom.minidom", "xml.etree.ElementTree",
)


def base_modules() -> tuple[str, ...]:
    from hf_compressed_optim.offline_corpus import DEFAULT_MODULES

    return tuple(m for m in DEFAULT_MODULES if m not in FINETUNE_MODULES)


class TextTask(Task):
    """Causal LM on (a part of) the offline corpus; from scratch, or from ``base_state``."""

    def __init__(self, size: str, block: int, batch: int, n_val: int, n_test: int,
                 device="cpu", max_train_blocks: int | None = None, modules=None,
                 name: str = "text", base_state: dict | None = None, what: str = ""):
        from hf_compressed_optim import offline_corpus as oc

        self.name, self.base_state = name, base_state
        corpus = oc.build_corpus(tuple(modules)) if modules else oc.build_corpus()
        ids = oc.pack_blocks(oc.encode(corpus), block)
        blocks = torch.tensor(ids, dtype=torch.long)
        blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
        train = blocks[n_val + n_test:]
        if max_train_blocks:
            train = train[:max_train_blocks]
        splits = {"val": Split(blocks[:n_val]), "test": Split(blocks[n_val:n_val + n_test]),
                  "train": Split(train)}
        super().__init__(splits, batch, device)
        self.size = size
        self.description = (f"LLaMA `{size}` {LLAMA_SIZES[size]} (hidden, layers, MLP, heads, "
                            f"KV heads) {what or 'from scratch on the offline docstring corpus'}: "
                            f"{len(train)} train / {n_val} val / {n_test} test blocks of "
                            f"{block} bytes, batch {batch}")

    def model(self, seed: int):
        model = build_llama(self.size, seed, self.device)
        if self.base_state is not None:
            model.load_state_dict(self.base_state)
        return model

    def loss(self, model, split: str, idx=None):
        x = self.splits[split].x
        x = (x if idx is None else x[idx]).to(self.device)
        return model(input_ids=x, labels=x).loss

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        was = model.training
        model.eval()
        x = self.splits[split].x
        losses = [self.loss(model, split, torch.arange(i, min(i + 32, len(x))))
                  * min(32, len(x) - i) for i in range(0, len(x), 32)]
        model.train(was)
        return {"loss": float(sum(losses) / len(x))}


def digits_available() -> bool:
    """The digits live inside scikit-learn (an optional dependency: the ``bench`` extra)."""
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


class DigitsTask(Task):
    name = "digits"
    metric = "accuracy"

    def __init__(self, batch: int, device="cpu", max_train: int | None = None):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        n_val, n_test = 180, 360
        train = slice(n_val + n_test, None if not max_train else n_val + n_test + max_train)
        splits = {"val": Split(x[:n_val], y[:n_val]),
                  "test": Split(x[n_val:n_val + n_test], y[n_val:n_val + n_test]),
                  "train": Split(x[train], y[train])}
        super().__init__(splits, batch, device)
        self.description = (f"CNN (151k parameters) on scikit-learn's handwritten digits "
                            f"(8x8 scans): {len(splits['train'].x)} train / {n_val} val / "
                            f"{n_test} test images, batch {batch}")

    def model(self, seed: int):
        torch.manual_seed(seed)
        return DigitsCNN().to(self.device)

    def loss(self, model, split: str, idx=None):
        s = self.splits[split]
        x, y = (s.x, s.y) if idx is None else (s.x[idx], s.y[idx])
        return F.cross_entropy(model(x.to(self.device)), y.to(self.device))

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        was = model.training
        model.eval()
        s = self.splits[split]
        logits = model(s.x.to(self.device))
        y = s.y.to(self.device)
        out = {"loss": float(F.cross_entropy(logits, y)),
               "accuracy": float((logits.argmax(1) == y).float().mean())}
        model.train(was)
        return out
