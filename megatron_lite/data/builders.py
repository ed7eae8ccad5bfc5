"""From a frozen DataConfig and a tokenizer to train/valid/test datasets and the micro-batch
iterators the training loop reads (spec §2.4 `BlendedMegatronDatasetBuilder`, §2.11 loaders).

The public entry point is `build_data_iterators`; `build_datasets` is the dataset half.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.mock import MockLowLevelDataset
from megatron_lite.data.samplers import CyclicSampler, LazyIterator, PretrainingSampler, collate
from megatron_lite.data.splits import (
    SPLIT_NAMES,
    Blend,
    split_indices,
    split_matrix,
    target_sizes_lines,
)


@dataclass(frozen=True)
class DataConfig:
    """The data flags of spec §10 as plain values (made once in pretrain from args)."""

    seq_length: int
    seed: int
    num_samples: tuple  # (train, valid, test) targets; None = one epoch (spec §2.1)
    micro_batch_size: int
    eval_micro_batch_size: int
    blend: Blend | None = None
    blend_per_split: tuple | None = None  # (train, valid, test) Blend or None each
    split: str | None = None
    mock: bool = False
    data_cache_path: str | None = None
    mmap_bin_files: bool = True
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = True
    mid_level_dataset_surplus: float = 0.005
    allow_ambiguous_pad_tokens: bool = False
    dataloader_type: str = "single"
    num_workers: int = 2
    num_dataset_builder_threads: int = 1  # datasets of one blend built concurrently


@dataclass
class TrainValidTest:
    train: object | None
    valid: object | None
    test: object | None


def resolve_pad_id(tokenizer, allow_ambiguous: bool = False) -> int:
    """spec §2.7: the tokenizer's pad id unless missing or equal to another special id, else -1."""
    pad = tokenizer.pad
    if pad is None or pad < 0:
        return -1
    others = {tokenizer.eod, tokenizer.bos}
    if pad in others and not allow_ambiguous:
        return -1
    return pad


def dataset_config(cfg: DataConfig, tokenizer) -> GPTDatasetConfig:
    if tokenizer.eod is None:
        raise ValueError("the tokenizer has no end-of-document token, which GPT datasets need")
    split = "1,1,1" if cfg.mock else cfg.split  # spec §2.2: mock forces 1,1,1
    return GPTDatasetConfig(
        sequence_length=cfg.seq_length, random_seed=cfg.seed, eod=tokenizer.eod,
        pad=resolve_pad_id(tokenizer, cfg.allow_ambiguous_pad_tokens),
        tokenizer_identifiers=dict(tokenizer.unique_identifiers), split=split,
        split_matrix=tuple(split_matrix(split)) if split else (),
        reset_position_ids=cfg.reset_position_ids, reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss, create_attention_mask=cfg.create_attention_mask,
        path_to_cache=cfg.data_cache_path, mmap_bin_files=cfg.mmap_bin_files,
        mid_level_dataset_surplus=cfg.mid_level_dataset_surplus, mock=cfg.mock,
        vocab_size=tokenizer.vocab_size)


class _Builder:
    """One build of all splits; low-level datasets are opened once per prefix."""

    def __init__(self, cfg: DataConfig, tokenizer, log: Callable[[str], None]):
        self.cfg, self.tokenizer, self.log = cfg, tokenizer, log
        self.gcfg = dataset_config(cfg, tokenizer)
        self._low: dict = {}

    def low_level(self, prefix: str | None):
        if prefix not in self._low:
            if prefix is None:
                self._low[prefix] = MockLowLevelDataset(self.tokenizer.vocab_size, self.tokenizer.eod)
            else:
                self._low[prefix] = IndexedDataset(prefix, mmap=self.cfg.mmap_bin_files)
                self.log(f" > {prefix}: {len(self._low[prefix].document_indices) - 1} documents, "
                         f"{len(self._low[prefix])} sequences")
        return self._low[prefix]

    def splits_of(self, prefix: str | None, matrix, sizes) -> list:
        """One mid-level dataset per split of one prefix (None where the split is None or empty)."""
        low = self.low_level(prefix)
        cls = MockGPTDataset if prefix is None else GPTDataset
        out = []
        for name, bookends, size in zip(SPLIT_NAMES, matrix, sizes):
            docs = split_indices(bookends, len(low))
            if docs is None or size == 0:
                out.append(None)
                continue
            out.append(cls(low, prefix, docs, size, name, self.gcfg, self.log))
        return out

    def blend(self, blend: Blend, matrix, sizes) -> list:
        """spec §2.4: weighted blends build ceil(t_i * (1 + surplus)) samples per dataset for
        targets t_i = ceil(N * w_i); unweighted ones build one epoch each, weighted by length."""
        weights = None
        if blend.weights is not None:
            total = sum(blend.weights)
            weights = [w / total for w in blend.weights]
        if len(blend.prefixes) == 1 and weights is None:
            return self.splits_of(blend.prefixes[0], matrix, sizes)
        targets = None
        if weights is None:
            per_dataset = [[None] * 3 for _ in blend.prefixes]
        else:
            if any(s is None for s, m in zip(sizes, matrix) if m is not None):
                raise ValueError("a weighted blend needs a target size for every split it builds "
                                 "(--full-validation builds the validation split unweighted)")
            targets = [[math.ceil((s or 0) * w) for s in sizes] for w in weights]
            surplus = self.cfg.mid_level_dataset_surplus
            per_dataset = [[math.ceil(t * (1 + surplus)) for t in row] for row in targets]
        mids = self._build_parallel(blend.prefixes, matrix, per_dataset)
        out = []
        for i, name in enumerate(SPLIT_NAMES):
            parts = [m[i] for m in mids]
            if matrix[i] is None or sizes[i] == 0 or any(p is None for p in parts):
                out.append(None)
                continue
            if targets is not None:
                w, size = weights, sum(row[i] for row in targets)
            else:
                w = [len(p) for p in parts]
                size = None if sizes[i] is None else min(sizes[i], sum(w))
            out.append(BlendedDataset(parts, w, size, name, self.cfg.data_cache_path, self.log))
        return out

    def _build_parallel(self, prefixes, matrix, per_dataset) -> list:
        """`splits_of` for every dataset of a blend, on --num-dataset-builder-threads threads
        (Megatron-LM's `_build_megatron_datasets_parallel`). With threads, each low-level dataset
        is opened first, once, and a dataset listed twice with the same sizes is built once (two
        threads must not write the same index cache file)."""
        if self.cfg.num_dataset_builder_threads <= 1:
            return [self.splits_of(p, matrix, row) for p, row in zip(prefixes, per_dataset)]
        for prefix in prefixes:
            self.low_level(prefix)
        jobs = list(dict.fromkeys((p, tuple(row)) for p, row in zip(prefixes, per_dataset)))
        with ThreadPoolExecutor(max_workers=min(self.cfg.num_dataset_builder_threads, len(jobs))) as pool:
            built = list(pool.map(lambda job: self.splits_of(job[0], matrix, list(job[1])), jobs))
        by_job = dict(zip(jobs, built))
        return [by_job[(p, tuple(row))] for p, row in zip(prefixes, per_dataset)]

    def build(self) -> TrainValidTest:
        cfg, sizes = self.cfg, list(self.cfg.num_samples)
        if cfg.mock:
            return TrainValidTest(*self.splits_of(None, self.gcfg.split_matrix, sizes))
        if cfg.blend is not None:
            return TrainValidTest(*self.blend(cfg.blend, self.gcfg.split_matrix, sizes))
        if cfg.blend_per_split is None:
            raise ValueError("no data: give --data-path, --train/valid/test-data-path or --mock-data")
        out = []
        for i, blend in enumerate(cfg.blend_per_split):
            if blend is None:
                out.append(None)
                continue
            # spec §2.2: each listed dataset belongs wholly to its split.
            matrix = [(0.0, 1.0) if j == i else None for j in range(3)]
            spoof = [sizes[i] if j == i else 0 for j in range(3)]
            if len(blend.prefixes) == 1:
                out.append(self.splits_of(blend.prefixes[0], matrix, spoof)[i])
            else:
                out.append(self.blend(blend, matrix, spoof)[i])
        return TrainValidTest(*out)


def build_datasets(cfg: DataConfig, tokenizer, *, is_first_rank: bool = True,
                   barrier: Callable[[], None] | None = None,
                   log: Callable[[str], None] | None = None) -> TrainValidTest:
    """Build (or load from the cache) the three splits. Rank 0 builds and caches first while
    the others wait at `barrier`, then they build too, normally from the cache (spec §2.4)."""
    log = log or (lambda msg: None)
    log("> building train, validation, and test datasets ...")
    log(target_sizes_lines(cfg.num_samples))
    result = _Builder(cfg, tokenizer, log).build() if is_first_rank else None
    if barrier is not None:
        barrier()
    if not is_first_rank:
        result = _Builder(cfg, tokenizer, lambda msg: None).build()
    log("> finished creating GPT datasets ...")
    return result


@dataclass
class DataIterators:
    """Micro-batch iterators (None where the split is absent); each yields dicts of
    tokens, labels, position_ids (int64 [b, s]) and loss_mask (float32 [b, s])."""

    train: object | None
    valid: object | None
    test: object | None
    datasets: TrainValidTest


def _loader(dataset, sampler, num_workers: int, seed: int):
    # An own generator: otherwise creating the iterator draws the workers' base seed from the
    # global torch RNG, at a moment that differs between a resumed and an uninterrupted run,
    # and shifts the dropout stream that checkpoints restore exactly.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))


def build_iterator(dataset, cfg: DataConfig, consumed_samples: int, micro_batch_size: int,
                   dp_rank: int, dp_size: int):
    if dataset is None:
        return None
    if cfg.dataloader_type == "single":
        sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    elif cfg.dataloader_type == "cyclic":
        sampler = CyclicSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    else:
        raise ValueError(f"--dataloader-type {cfg.dataloader_type} is not available (use single or cyclic)")
    return LazyIterator(_loader(dataset, sampler, cfg.num_workers, cfg.seed))


def build_data_iterators(cfg: DataConfig, tokenizer, dp_rank: int, dp_size: int, *,
                         consumed_train_samples: int = 0, consumed_valid_samples: int = 0,
                         is_first_rank: bool = True, barrier: Callable[[], None] | None = None,
                         log: Callable[[str], None] | None = None) -> DataIterators:
    """Datasets for all splits, then this DP rank's iterators: train and valid resume at their
    consumed-sample counters, test always starts at 0 (spec §2.11)."""
    ds = build_datasets(cfg, tokenizer, is_first_rank=is_first_rank, barrier=barrier, log=log)
    return DataIterators(
        train=build_iterator(ds.train, cfg, consumed_train_samples, cfg.micro_batch_size, dp_rank, dp_size),
        valid=build_iterator(ds.valid, cfg, consumed_valid_samples, cfg.eval_micro_batch_size, dp_rank,
                             dp_size),
        test=build_iterator(ds.test, cfg, 0, cfg.eval_micro_batch_size, dp_rank, dp_size),
        datasets=ds)
