"""GPTDataset samples, masks and index caching; blends, splits and the dataset builder
(spec §2.2-§2.10)."""
import os

import numpy as np
import pytest
import torch

from megatron_lite.data.builders import DataConfig, build_datasets, resolve_pad_id
from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetConfig, ltor_masks_and_position_ids
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.mock import MockLowLevelDataset
from megatron_lite.data.splits import (
    Blend,
    parse_blend,
    split_indices,
    split_matrix,
    target_sizes_lines,
    train_valid_test_num_samples,
)
from megatron_lite.data.tokenizers import TokenizerConfig, build_tokenizer

EOD = 99


def make_dataset(path, n_docs=60, seed=0, vocab=EOD) -> str:
    """Documents of random length; document d holds ids (d*7 + i) % vocab... then EOD."""
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(path), np.uint16)
    for d in range(n_docs):
        n = int(rng.integers(1, 30))
        b.add_document(list((d * 7 + np.arange(n)) % vocab) + [EOD], [n + 1])
    b.finalize()
    return str(path)


def config(**kw) -> GPTDatasetConfig:
    base = dict(sequence_length=16, random_seed=1234, eod=EOD, pad=-1, split="949,50,1",
                split_matrix=tuple(split_matrix("949,50,1")))
    base.update(kw)
    return GPTDatasetConfig(**base)


def reference_masks(tokens, eod, reset_pos, reset_attn, eod_mask):
    s = len(tokens)
    mask = np.tril(np.ones((s, s), bool))
    pos = np.arange(s)
    loss = np.ones(s, np.float32)
    if eod_mask:
        loss[tokens == eod] = 0
    prev = 0
    for i in np.nonzero(tokens == eod)[0]:
        if reset_attn:
            mask[i + 1:, :i + 1] = False
        if reset_pos:
            pos[i + 1:] -= i + 1 - prev
            prev = i + 1
    return ~mask, loss, pos


@pytest.mark.parametrize("flags", [(False, False, False), (True, False, False), (False, True, False),
                                   (True, True, True)])
def test_masks_and_position_ids(flags):
    tokens = torch.tensor([5, 3, 9, 9, 1, 9, 2, 2, 7, 9])
    attn, loss, pos = ltor_masks_and_position_ids(tokens, 9, *flags, create_attention_mask=True)
    want_attn, want_loss, want_pos = reference_masks(tokens.numpy(), 9, *flags)
    assert attn.shape == (1, 10, 10) and attn.dtype == torch.bool
    np.testing.assert_array_equal(attn[0].numpy(), want_attn)
    np.testing.assert_array_equal(loss.numpy(), want_loss)
    np.testing.assert_array_equal(pos.numpy(), want_pos)


def test_samples_are_windows_of_the_shuffled_document_stream(tmp_path):
    low = IndexedDataset(make_dataset(tmp_path / "d"))
    docs = np.arange(0, 50, dtype=np.int32)
    ds = GPTDataset(low, str(tmp_path / "d"), docs, 40, "train", config(path_to_cache=str(tmp_path / "c")))
    stream = np.concatenate([low.get(int(d)) for d in ds.document_index]).astype(np.int64)
    S = 16
    for idx in range(len(ds)):
        k = int(ds.shuffle_index[idx])
        np.testing.assert_array_equal(ds.text(idx), stream[k * S:k * S + S + 1])
    sample = ds[3]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert len(ds) >= 40 and ds.sample_index.shape == (len(ds) + 1, 2)


def test_final_partial_validation_sample_is_padded_and_masked(tmp_path):
    low = IndexedDataset(make_dataset(tmp_path / "d", n_docs=5))
    ds = GPTDataset(low, "d", np.arange(5, dtype=np.int32), None, "valid",
                    config(drop_last_partial_validation_sequence=False, pad=-1))
    T = int(low.sequence_lengths.sum())
    assert len(ds) == -(-(T - 1) // 16)
    last = next(ds[i] for i in range(len(ds)) if int(ds.shuffle_index[i]) == len(ds) - 1)
    n_real = T - 1 - (len(ds) - 1) * 16  # label positions that exist
    assert last["loss_mask"][:n_real].all() and not last["loss_mask"][n_real:].any()
    assert (last["labels"][n_real:] == 0).all()  # pad ids replaced by 0 (spec §2.7)


def test_reset_attention_mask_adds_the_mask(tmp_path):
    low = IndexedDataset(make_dataset(tmp_path / "d"))
    ds = GPTDataset(low, "d", np.arange(60, dtype=np.int32), 8, "train",
                    config(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True,
                           path_to_cache=str(tmp_path / "c")))
    s = ds[0]
    assert s["attention_mask"].shape == (1, 16, 16)
    assert (s["loss_mask"][s["tokens"] == EOD] == 0).all()


def test_index_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path):
    prefix = make_dataset(tmp_path / "d")
    docs = np.arange(0, 50, dtype=np.int32)

    def build(**kw):
        cache_kw = {k: kw.pop(k) for k in list(kw) if k in ("num_samples", "split_name")}
        cfg = config(**kw)
        return GPTDataset(IndexedDataset(prefix), prefix, docs, cache_kw.get("num_samples", 30),
                          cache_kw.get("split_name", "train"), cfg)

    first = build()
    cache_dir = tmp_path / "d" / "cache" / "GPTDataset_indices"  # default: named after the prefix
    files = sorted(os.listdir(cache_dir))
    assert first.built_anew and len(files) == 4
    assert files[0].startswith(first.unique_description_hash + "-GPTDataset-train-")
    again = build()
    assert not again.built_anew and again.unique_description_hash == first.unique_description_hash
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    for change in ({"random_seed": 5}, {"sequence_length": 8}, {"num_samples": 31}, {"split_name": "valid"}):
        assert build(**change).built_anew, change
    make_dataset(tmp_path / "d", seed=1)  # same prefix, new contents
    assert build().built_anew
    assert len(os.listdir(cache_dir)) == 4 * 6


def test_split_and_blend_parsing():
    assert split_matrix("949,50,1") == [(0, 0.949), (0.949, 0.999), (0.999, 1.0)]
    assert split_matrix("99,1,0")[2] is None
    assert split_matrix("1,1,1")[1] == pytest.approx((1 / 3, 2 / 3))
    parts = [split_indices(b, 1000) for b in split_matrix("949,50,1")]
    assert [(p[0], p[-1] + 1) for p in parts] == [(0, 949), (949, 999), (999, 1000)]
    assert split_indices((0.0, 0.5), 5).tolist() == [0, 1]  # round(2.5) == 2 (banker's rounding)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == Blend(("a", "b"), (0.3, 0.7))
    assert parse_blend(["a", "b"]) == Blend(("a", "b"))
    assert parse_blend(["a"]) == Blend(("a",))
    assert parse_blend(["x1", "a", "2", "b"]) == Blend(("x1", "a", "2", "b"))
    assert train_valid_test_num_samples(100, 8, 10, 5, 16) == (800, 11 * 5 * 16, 80)
    assert target_sizes_lines((800, 880, 80)).splitlines() == [
        " > datasets target sizes (minimum size):", "    train:      800", "    validation: 880",
        "    test:       80"]


def null_tokenizer(vocab=EOD + 1):
    return build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=vocab))


def data_config(**kw) -> DataConfig:
    base = dict(seq_length=16, seed=1234, num_samples=(100, 20, 10), micro_batch_size=2,
                eval_micro_batch_size=2, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_weighted_blend_hits_its_weights(tmp_path):
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "b", n_docs=80, seed=3)
    cfg = data_config(blend=Blend((a, b), (0.3, 0.7)), split="90,10,0", data_cache_path=str(tmp_path / "c"))
    lines = []
    ds = build_datasets(cfg, null_tokenizer(), log=lines.append)
    assert ds.test is None
    assert len(ds.train) == 30 + 70  # sum of ceil(N * w_i) (spec §2.4)
    assert np.bincount(ds.train.dataset_index).tolist() == [30, 70]
    assert len(ds.train.datasets[0]) >= 31  # ceil(30 * 1.005)
    assert ds.train[0]["dataset_id"] in (0, 1) and target_sizes_lines((100, 20, 10)) in lines
    lines.clear()
    again = build_datasets(cfg, null_tokenizer(), log=lines.append)
    np.testing.assert_array_equal(again.train.dataset_index, ds.train.dataset_index)
    assert any(line.startswith("Load the BlendedDataset train") for line in lines)
    assert not any(line.startswith("Build") for line in lines)  # every index came from the cache


def test_builder_threads_build_the_same_blend(tmp_path):
    """--num-dataset-builder-threads builds the datasets of a blend concurrently; the result is
    the sequential one (a dataset listed twice is built once, no two threads share a cache file)."""
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "b", n_docs=80, seed=3)
    blend = Blend((a, b, a), (0.3, 0.5, 0.2))
    one = build_datasets(data_config(blend=blend, split="90,10,0", data_cache_path=str(tmp_path / "c1")),
                         null_tokenizer())
    four = build_datasets(data_config(blend=blend, split="90,10,0", data_cache_path=str(tmp_path / "c4"),
                                      num_dataset_builder_threads=4), null_tokenizer())
    np.testing.assert_array_equal(one.train.dataset_index, four.train.dataset_index)
    for i in (0, 10, 99):
        np.testing.assert_array_equal(one.train[i]["tokens"], four.train[i]["tokens"])
        np.testing.assert_array_equal(one.valid[i % len(one.valid)]["tokens"],
                                      four.valid[i % len(four.valid)]["tokens"])


def test_unweighted_blend_and_oversampling(tmp_path):
    a, b = make_dataset(tmp_path / "a", n_docs=10), make_dataset(tmp_path / "b", n_docs=30, seed=2)
    ds = build_datasets(data_config(blend=Blend((a, b)), split="1,0,0", num_samples=(10**6, 0, 0)),
                        null_tokenizer())
    sizes = [len(d) for d in ds.train.datasets]
    assert len(ds.train) == sum(sizes)  # min(N, sum of one-epoch lengths)
    assert np.bincount(ds.train.dataset_index).tolist() == sizes
    with pytest.raises(IndexError, match="oversamples"):
        build_datasets(data_config(blend=Blend((a, b), (0.5, 0.5)), split="1,0,0", num_samples=(200, 0, 0),
                                   mid_level_dataset_surplus=-0.9), null_tokenizer())


def test_per_split_paths_use_whole_datasets(tmp_path):
    a, b = make_dataset(tmp_path / "a", n_docs=10), make_dataset(tmp_path / "b", n_docs=12, seed=2)
    ds = build_datasets(data_config(blend_per_split=(Blend((a,)), Blend((b,)), None)), null_tokenizer())
    assert ds.test is None
    assert ds.train.indices.tolist() == list(range(10)) and ds.valid.indices.tolist() == list(range(12))


def test_missing_prefix_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_text_document.idx does not exist"):
        build_datasets(data_config(blend=Blend((str(tmp_path / "nothing_text_document"),)), split="1,0,0"),
                       null_tokenizer())


def test_mock_data_is_megatrons_low_level_mock():
    low = MockLowLevelDataset(vocab_size=256, eod=255)
    lengths = np.random.default_rng(0).integers(1, 4096, size=100_000, dtype=np.int32)
    np.testing.assert_array_equal(low.sequence_lengths, lengths)
    n = int(lengths[3])
    full = low.get(3)
    assert full.tolist() == [(i + 1) % 256 for i in range(n - 1)] + [255]
    assert low.get(3, 2, 3).tolist() == full[2:5].tolist()
    ds = build_datasets(data_config(mock=True, num_samples=(64, 8, 8)), null_tokenizer(256))
    assert [d.split for d in (ds.train, ds.valid, ds.test)] == ["train", "valid", "test"]
    assert ds.train.indices[0] == 0 and ds.valid.indices[0] == 33333 and ds.test.indices[0] == 66667


def test_pad_id_resolution():
    class Tok:
        eod, bos = 2, 1

        def __init__(self, pad):
            self.pad = pad

    assert resolve_pad_id(Tok(None)) == -1 and resolve_pad_id(Tok(-1)) == -1
    assert resolve_pad_id(Tok(3)) == 3 and resolve_pad_id(Tok(2)) == -1
    assert resolve_pad_id(Tok(2), allow_ambiguous=True) == 2
