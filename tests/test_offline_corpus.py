"""The offline corpus: deterministic, large enough to train on, exact byte round trip."""

import hashlib
import subprocess
import sys

from hf_compressed_optim import offline_corpus as oc


def test_corpus_is_deterministic_and_nontrivial():
    first = oc.build_corpus()
    oc.build_corpus.cache_clear()
    second = oc.build_corpus()
    assert hashlib.sha256(first.encode()).digest() == hashlib.sha256(second.encode()).digest()
    assert len(first) > 200_000  # several thousand 128-byte blocks
    assert "Return" in first and "function" in first  # English prose, not code
    # a fresh interpreter (different import state) builds the same bytes
    out = subprocess.run(
        [sys.executable, "-c", "import hashlib; from hf_compressed_optim.offline_corpus import "
         "build_corpus; print(hashlib.sha256(build_corpus().encode()).hexdigest())"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(first.encode()).hexdigest()


def test_byte_encoding_round_trips():
    text = oc.build_corpus()[:5000] + " naïve café – ∑ 😀"
    ids = oc.encode(text)
    assert all(0 <= i < oc.VOCAB_SIZE for i in ids)
    assert oc.decode(ids) == text
    assert bytes(ids) == text.encode("utf-8")


def test_pack_blocks_and_datasets():
    ids = list(range(10))
    assert oc.pack_blocks(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    d = oc.lm_datasets(block_size=64, eval_fraction=0.1, seed=1, max_blocks=200)
    assert len(d["train"]) == 180 and len(d["eval"]) == 20
    row = d["train"][0]
    assert len(row["input_ids"]) == 64 and row["labels"] == row["input_ids"]
    again = oc.lm_datasets(block_size=64, eval_fraction=0.1, seed=1, max_blocks=200)
    assert again["eval"]["input_ids"] == d["eval"]["input_ids"]
    # the splits together are blocks of the corpus stream, disjoint between train and eval
    stream = bytes(oc.encode(oc.build_corpus()))
    assert bytes(row["input_ids"]) in stream
    train = {bytes(r) for r in d["train"]["input_ids"]}
    assert not any(bytes(r) in train for r in d["eval"]["input_ids"])
