"""Sample order (spec §2.11): global batches do not depend on the DP size or the micro-batch
size, and resuming from consumed_samples continues the same sequence."""
import pytest
import torch

from megatron_lite.data.builders import DataConfig, build_data_iterators, build_iterator
from megatron_lite.data.samplers import CyclicSampler, PretrainingSampler
from megatron_lite.data.tokenizers import TokenizerConfig, build_tokenizer


def global_batches(sampler_cls, total, consumed, b, dp, B, steps):
    """For each global batch, the sample ids of all DP ranks, in (micro-step, rank) order."""
    iters = [iter(sampler_cls(total, consumed, b, r, dp)) for r in range(dp)]
    out = []
    for _ in range(steps):
        ids = []
        for _ in range(B // (b * dp)):
            for it in iters:
                ids.extend(next(it))
        out.append(ids)
    return out


@pytest.mark.parametrize("sampler_cls", [PretrainingSampler, CyclicSampler])
def test_global_batches_are_layout_independent_and_resumable(sampler_cls):
    total, B = 50, 8
    ref = global_batches(sampler_cls, total, 0, 8, 1, B, 5)
    for b, dp in [(1, 1), (2, 2), (1, 4), (4, 2), (2, 4)]:
        got = global_batches(sampler_cls, total, 0, b, dp, B, 5)
        assert [sorted(g) for g in got] == [sorted(g) for g in ref], (b, dp)
    resumed = global_batches(sampler_cls, total, 2 * B, 2, 2, B, 3)
    assert [sorted(g) for g in resumed] == [sorted(g) for g in ref[2:5]]
    if sampler_cls is PretrainingSampler:
        assert ref[0] == list(range(8))
        assert len(list(PretrainingSampler(total, 0, 2, 0, 2))) == 12  # tail of 50 % 4 dropped


def test_cyclic_sampler_runs_past_the_end():
    batches = global_batches(CyclicSampler, 10, 0, 5, 1, 5, 4)
    assert sorted(batches[0] + batches[1]) == list(range(10)) == sorted(batches[2] + batches[3])
    assert batches[0] + batches[1] != batches[2] + batches[3]  # a new permutation per epoch


def test_sampler_rejects_exhausted_data():
    with pytest.raises(ValueError, match="no samples left"):
        PretrainingSampler(10, 10, 1, 0, 1)


@pytest.fixture(scope="module")
def mock_data():
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=512))
    cfg = DataConfig(seq_length=32, seed=1234, num_samples=(64, 16, 16), micro_batch_size=4,
                     eval_micro_batch_size=4, mock=True, num_workers=1)
    return cfg, build_data_iterators(cfg, tok, 0, 1)


def _tokens_of_global_batches(mock_data, micro_batch_size, dp, consumed=0, steps=3, B=8):
    cfg, its = mock_data
    iters = [build_iterator(its.datasets.train, cfg, consumed, micro_batch_size, r, dp) for r in range(dp)]
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(B // (micro_batch_size * dp)):
            for it in iters:
                batch = next(it)
                assert batch["tokens"].shape == (micro_batch_size, 32)
                assert batch["tokens"].dtype == torch.int64
                rows.extend(map(tuple, batch["tokens"].tolist()))
        out.append(sorted(rows))
    return out


def test_mock_pipeline_gives_the_same_global_batches_for_any_layout(mock_data):
    cfg, its = mock_data
    ref = [sorted(map(tuple, torch.cat([next(its.train)["tokens"] for _ in range(2)]).tolist()))
           for _ in range(3)]  # through build_data_iterators and a DataLoader worker
    assert its.valid is not None and its.test is not None
    for b, dp in [(2, 2), (1, 4), (1, 2)]:
        assert _tokens_of_global_batches(mock_data, b, dp) == ref, (b, dp)
    assert _tokens_of_global_batches(mock_data, 2, 2, consumed=8, steps=2) == ref[1:]
    assert len({row for batch in ref for row in batch}) == 24  # distinct samples


def test_absent_split_has_no_iterator():
    cfg = DataConfig(seq_length=8, seed=1, num_samples=(8, 0, 0), micro_batch_size=1, eval_micro_batch_size=1)
    assert build_iterator(None, cfg, 0, 1, 0, 1) is None
