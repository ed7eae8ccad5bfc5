"""End to end on real data: preprocess a small JSONL corpus with the GPT-2 tokenizer, train on a
weighted blend of two datasets with --split through torchrun, and check the target-size lines,
the index caches, their reuse by a second run, and identical losses at DP=2 and DP=1."""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from tests.functional.test_pretrain_cli import iteration_lines, torchrun

ROOT = Path(__file__).resolve().parents[2]
GPT2 = ROOT / "tests" / "data" / "gpt2"  # GPT-2 vocab.json / merges.txt, copied into the repo
WORDS = ("the a model data token parallel tensor pipeline gradient loss batch sequence layer "
         "attention network training step rank process learns reads writes small large fast").split()


def corpus(path: Path, n_docs: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                         for _ in range(rng.randint(1, 6))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prefixes = []
    for name, n, seed in (("a", 150, 1), ("b", 250, 2)):
        src = corpus(d / f"{name}.jsonl", n, seed)
        assert tool.main(["--input", src, "--output-prefix", str(d / name), "--tokenizer-type",
                          "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
                          "--merge-file", str(GPT2 / "merges.txt"), "--append-eod", "--workers", "1"]) == 0
        prefixes.append(str(d / f"{name}_text_document"))
    return d, prefixes


FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
    "--merge-file", str(GPT2 / "merges.txt"), "--split", "90,8,2",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
    "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
    "--attention-dropout", "0", "--hidden-dropout", "0",  # dropout masks depend on the layout
    "--distributed-backend", "gloo", "--seed", "1234", "--num-workers", "1",
]


def test_train_on_a_weighted_blend_reusing_cached_indices(datasets):
    d, (a, b) = datasets
    cache = d / "cache"
    flags = [*FLAGS, "--data-path", "0.3", a, "0.7", b, "--data-cache-path", str(cache)]
    first = torchrun(2, "pretrain_gpt.py", *flags).stdout
    assert (" > datasets target sizes (minimum size):\n    train:      16\n    validation: 12\n"
            "    test:       4\n") in first
    assert "Build and save the GPTDataset train indices" in first
    assert "Build and save the BlendedDataset valid indices" in first
    files = sorted(p.name for p in cache.iterdir())
    assert sum(f.endswith("-GPTDataset-train-shuffle_index.npy") for f in files) == 2
    assert sum(f.endswith("-BlendedDataset-test-dataset_index.npy") for f in files) == 1
    losses = [(r[0], r[5]) for r in iteration_lines(first)]
    assert len(losses) == 4
    second = torchrun(1, "pretrain_gpt.py", *flags).stdout  # DP = 1 now, same global batches
    assert "Build and save" not in second and "Load the GPTDataset train indices" in second
    assert [(r[0], r[5]) for r in iteration_lines(second)] == losses
    assert sorted(p.name for p in cache.iterdir()) == files



def test_an_empty_test_split_is_skipped(datasets, tmp_path):
    """--split 99,1,0 (29 of Megatron's configs): training, the saves and the final validation run;
    the empty test split is skipped as Megatron skips it, not a crash."""
    _, (a, _) = datasets
    flags = [f if f != "90,8,2" else "99,1,0" for f in FLAGS]
    proc = torchrun(1, "pretrain_gpt.py", *flags, "--data-path", a, "--save", str(tmp_path / "ckpt"),
                    "--save-interval", "4")
    assert len(iteration_lines(proc.stdout)) == 4
    assert "validation loss at iteration 4 on validation set" in proc.stdout
    assert "on test set" not in proc.stdout
