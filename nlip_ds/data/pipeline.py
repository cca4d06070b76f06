"""The loader: webdataset shards -> batches, as a visible list of stages, with exact epochs and exact resume.

Planning (every rank computes the same plan for the epoch, from index.json counts):

    shard list -> epoch-seeded shard shuffle -> split by node -> split by worker -> pad counts

Each worker process (a DataLoader worker, or the main process when workers=0) then runs:

    its shards [+ pad samples from the start of its own list] -> tar to samples (skip-and-count handler)
    -> sample shuffle -> resume cursor -> decode (skip-and-count) -> image transform -> tokenize
    -> batch into chunks of batch_size

and the main process merges the workers' chunks sample by sample in a fixed round-robin order (worker 0, 1,
..., skipping finished workers) into batches of batch_size.

Why the merge: shards are split between ranks and workers as whole files, so the workers of a rank hold
different numbers of samples. Batching inside each worker would leave one short batch per worker; merging the
samples gives full batches and only one short last batch, of the same size on every rank. Because the merge
order depends only on each worker's (deterministic) stream, the batches do not depend on process timing or
chunk sizes, and a position is just "how far each worker's stream has been consumed" - which is what
`state_dict()` stores, so a resumed run skips the consumed samples without decoding them and continues with
the very next one.

Modes:
- exact: every sample once per epoch across ranks and workers. The rank with fewer samples repeats samples from
  the start of its workers' own lists, flagged pad=True (as torch's DistributedSampler pads), so every rank
  yields the same number of batches of the same sizes; samples lost to corruption are padded the same way.
- resampled (training only, huge datasets): shards drawn with replacement per (seed, epoch, rank, worker),
  sources weighted by data.train_weights; data.samples_per_epoch // (world_size * batch_size) full batches.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nlip_ds.config import ConfigError
from nlip_ds.data.samples import SampleError, SkipCounter, collate, crop_rng, decode_sample, eval_transform, \
    gather, raw_sample_id, tar_reason, train_transform
from nlip_ds.data.shards import Shard, expand_pattern, shard_counts
from nlip_ds.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATE_VERSION = 1
SKIP_CHECK_MIN_SEEN = 1000  # samples a rank must have seen before the skip rate is checked mid-epoch (noise)


class SkipRateError(RuntimeError):
    """More than data.max_skip_rate of the samples were skipped: the run stops instead of training on them."""


@dataclass(frozen=True, eq=False)
class LoaderSpec:
    """Everything a worker needs to build its stages; fixed for the loader's life."""

    split: str
    sources: tuple[tuple[Shard, ...], ...]  # non-empty shards per '::' source
    weights: tuple[float, ...]
    tokenizer: Tokenizer
    image_size: int
    batch_size: int
    context_length: int
    train: bool
    seed: int
    shuffle_buffer: int
    crop_scale_min: float
    max_pixels: int
    max_skip_rate: float
    resampled: bool
    samples_per_epoch: Optional[int]
    rank: int
    world_size: int
    workers: int  # DataLoader processes; 0 runs the stages in the main process as one stream
    pin_memory: bool = False  # batches' images in page-locked memory (GPU runs: asynchronous copies)

    @property
    def streams(self) -> int:
        return max(1, self.workers)

    @property
    def shards(self) -> list[Shard]:
        return [s for source in self.sources for s in source]


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class EpochPlan:
    """This rank's share of one epoch."""

    worker_shards: tuple[tuple[Shard, ...], ...]  # exact mode: the shards each worker reads
    pads: tuple[int, ...]  # exact mode: pad samples each worker adds from the start of its own list
    quotas: tuple[Optional[int], ...]  # resampled mode: samples each worker yields
    rank_samples: int  # samples (pads included) this rank yields, the same on every rank
    num_batches: int


def shuffle_shards(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    order = list(shards)
    random.Random(f"nlip-shards/{seed}/{epoch}").shuffle(order)
    return order


def split_by_node(shards: list, rank: int, world_size: int) -> list:
    return shards[rank::world_size]


def split_by_worker(shards: list, worker: int, num_workers: int) -> list:
    return shards[worker::num_workers]


def even_split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def plan_exact(spec: LoaderSpec, epoch: int) -> EpochPlan:
    shards = spec.shards
    if spec.train:
        shards = shuffle_shards(shards, spec.seed, epoch)
    per_rank = [split_by_node(shards, r, spec.world_size) for r in range(spec.world_size)]
    rank_samples = max(sum(s.num_samples for s in mine) for mine in per_rank)
    mine = per_rank[spec.rank]
    pad = rank_samples - sum(s.num_samples for s in mine)
    worker_shards = tuple(tuple(split_by_worker(mine, w, spec.streams)) for w in range(spec.streams))
    return EpochPlan(worker_shards, tuple(even_split(pad, spec.streams)), (None,) * spec.streams,
                     rank_samples, math.ceil(rank_samples / spec.batch_size))


def plan_resampled(spec: LoaderSpec) -> EpochPlan:
    num_batches = spec.samples_per_epoch // (spec.world_size * spec.batch_size)
    rank_samples = num_batches * spec.batch_size
    return EpochPlan((), (0,) * spec.streams, tuple(even_split(rank_samples, spec.streams)), rank_samples,
                     num_batches)


# ------------------------------------------------------------------------------------------------ worker stages


def shard_urls(shards) -> Iterator[dict]:
    for shard in shards:
        yield {"url": str(shard.path)}


def read_shards(shards: Iterable[Shard], counter: SkipCounter) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of each shard in turn. A tar error is counted by reason
    (naming the shard and the last key read before it) and ends that shard; samples that the index lists but
    the shard did not yield (a truncated tar, a corrupt member header) are counted as `short_shard`."""
    for shard in shards:
        read, last_key, broken = 0, None, False

        def handler(exn: Exception) -> bool:
            nonlocal broken
            reason = tar_reason(exn)
            if reason != "duplicate_member":
                if broken:  # a consequence of the first error (a cut member, then no next header): once
                    return True
                broken = True
            where = f"after key {last_key}" if last_key is not None else "before the first sample"
            message = exn.args[0] if exn.args else ""
            counter.count(reason, f"{shard.path} {where}: {type(exn).__name__}: {message}")
            return True

        for sample in wds.tarfile_samples([{"url": str(shard.path)}], handler=handler):
            read, last_key = read + 1, sample["__key__"]
            yield sample
        if read < shard.num_samples:
            counter.count("short_shard", f"{shard.path}: {read} of the {shard.num_samples} samples its index "
                          f"lists (last key {last_key})", n=shard.num_samples - read)


def resampled_shards(spec: LoaderSpec, rng: random.Random, counter: SkipCounter) -> Iterator[Shard]:
    """Endless weighted draws of shards; stops the run if a long series of draws yields no good sample (every
    shard holds a sample, so the shuffle buffer is full and decoding has begun after shuffle_buffer draws)."""
    patience, last_good = 2 * len(spec.shards) + 10 + spec.shuffle_buffer, -1
    for draw in itertools.count():
        if draw % patience == 0:
            if counter.good == last_good:
                raise RuntimeError(f"{counter.where}: {patience} shard draws gave no readable sample")
            last_good = counter.good
        source = rng.choices(spec.sources, weights=spec.weights)[0]
        yield rng.choice(source)


def _drop_duplicates(src, counter: SkipCounter):
    """Skip a sample whose id this stream already read in this epoch (the same key in two shards, or a shard
    listed twice); the first occurrence is kept, whether or not it decodes. Runs before the resume cursor, so a
    resumed stream drops the same samples as the uninterrupted one."""
    seen: set[int] = set()
    for raw in src:
        sample_id = raw_sample_id(raw)
        if sample_id is not None:
            if sample_id in seen:
                counter.count("duplicate_key", f"{raw.get('__url__')} key {raw.get('__key__')}: sample id "
                              f"{sample_id} was already read in this epoch")
                continue
            seen.add(sample_id)
        yield raw


def _with_pads(src, shards, count: int):
    """Append `count` samples from the start of `shards` (cycling), flagged as pads. Their read errors were
    counted on the first pass, so they are ignored here."""
    yield from src
    while count > 0:
        produced = 0
        for sample in wds.tarfile_samples(shard_urls(shards), handler=wds.ignore_and_continue):
            sample["__pad__"] = True
            yield sample
            produced, count = produced + 1, count - 1
            if count == 0:
                return
        if produced == 0:
            return


class ResumeCursor:
    """Numbers the raw samples in stream order and drops the first `start` (consumed before the checkpoint)
    without decoding them, together with the skip counts they carried. `position` ends as the stream length."""

    def __init__(self, start: int, counter: SkipCounter):
        self.start, self.counter, self.position = start, counter, start

    def __call__(self, src):
        self.position = 0
        for sample in src:
            if self.position < self.start:
                self.counter.discard()
            else:
                sample["__pos__"] = self.position
                yield sample
            self.position += 1
        if self.position <= self.start:
            self.counter.discard()


def _decode(src, counter: SkipCounter, max_pixels: int):
    for raw in src:
        try:
            sample = decode_sample(raw, max_pixels)
        except SampleError as err:
            if not raw.get("__pad__"):
                counter.count(err.reason, f"{raw.get('__url__')} key {raw.get('__key__')}: {err}")
            continue
        counter.good += 1
        sample.update(pad=raw.get("__pad__", False), pos=raw["__pos__"], skips=counter.drain())
        yield sample


with_pads = wds.pipelinefilter(_with_pads)
drop_duplicates = wds.pipelinefilter(_drop_duplicates)
decode = wds.pipelinefilter(_decode)


def chunk_collate(samples: list[dict]) -> dict:
    chunk = collate(samples)
    chunk.update(_pos=[s["pos"] for s in samples], _skips=[s["skips"] for s in samples])
    return chunk


@dataclass
class WorkerStart:
    """Where a worker's stream resumes: raw samples already consumed, good samples already delivered."""

    pos: int = 0
    delivered: int = 0


@dataclass(frozen=True)
class WorkerTask:
    """What one worker reads: its shards (exact mode), then `pads` samples from the start of `pad_shards`;
    in resampled mode, `quota` more samples from endless shard draws."""

    shards: tuple[Shard, ...] = ()
    pad_shards: tuple[Shard, ...] = ()
    pads: int = 0
    quota: Optional[int] = None

    @classmethod
    def of(cls, plan: EpochPlan, worker: int, start: WorkerStart) -> "WorkerTask":
        if plan.quotas[worker] is not None:
            return cls(quota=plan.quotas[worker] - start.delivered)
        shards = plan.worker_shards[worker]
        return cls(shards, shards, plan.pads[worker])


def worker_stages(spec: LoaderSpec, epoch: int, worker: int, task: WorkerTask, counter: SkipCounter,
                  cursor: ResumeCursor) -> list:
    """The stages of one worker's stream up to tokenization, in order."""
    if spec.resampled:
        draws = random.Random(f"nlip-resample/{spec.seed}/{epoch}/{spec.rank}/{worker}")
        shards = lambda: resampled_shards(spec, draws, counter)  # noqa: E731
    else:
        shards = lambda: task.shards  # noqa: E731
    shuffle = spec.train and spec.shuffle_buffer > 1
    shuffle_rng = random.Random(f"nlip-samples/{spec.seed}/{epoch}/{spec.rank}/{worker}")
    return [
        lambda: read_shards(shards(), counter),
        drop_duplicates(counter) if not spec.resampled else None,  # resampling repeats samples on purpose
        with_pads(task.pad_shards, task.pads) if task.pads else None,
        wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=shuffle_rng) if shuffle else None,
        cursor,
        decode(counter, spec.max_pixels),
        wds.slice(task.quota) if task.quota is not None else None,
        wds.map(lambda sample: _transform(spec, epoch, worker, sample)),
        wds.map(lambda sample: _tokenize(spec.tokenizer, spec.context_length, sample)),
    ]


def _transform(spec: LoaderSpec, epoch: int, worker, sample: dict) -> dict:
    if spec.train:
        rng = crop_rng(spec.seed, epoch, spec.rank, worker, sample["pos"])
        sample["image"] = train_transform(sample["image"], spec.image_size, spec.crop_scale_min, rng)  # (3, H, W)
    else:
        sample["image"] = eval_transform(sample["image"], spec.image_size)  # (3, H, W)
    return sample


def _tokenize(tokenizer: Tokenizer, context_length: int, sample: dict) -> dict:
    sample["input_ids"], sample["attention_mask"] = tokenizer.encode_one(sample["caption"], context_length)
    return sample


class WorkerStreams(IterableDataset):
    """One epoch of every worker's stream; each worker yields its chunks, then an end marker."""

    def __init__(self, spec: LoaderSpec, plan: EpochPlan, epoch: int, starts: list[WorkerStart]):
        super().__init__()
        self.spec, self.plan, self.epoch, self.starts = spec, plan, epoch, starts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        counter = SkipCounter(f"{self.spec.split} rank {self.spec.rank} worker {worker}")
        cursor = ResumeCursor(self.starts[worker].pos, counter)
        task = WorkerTask.of(self.plan, worker, self.starts[worker])
        batched = wds.batched(self.spec.batch_size, collation_fn=chunk_collate, partial=True)
        for chunk in wds.DataPipeline(*worker_stages(self.spec, self.epoch, worker, task, counter, cursor), batched):
            chunk["_worker"] = worker
            yield chunk
        yield {"_worker": worker, "_end": True, "_raw": cursor.position, "_skips": counter.drain()}


# ------------------------------------------------------------------------------------------------ main process


@dataclass
class EpochPosition:
    """The loader's position in an epoch: what `state_dict()` saves."""

    epoch: int
    streams: int
    batches: int = 0
    samples: int = 0
    pads: int = 0
    extra_pads: int = 0  # pads that replace samples lost to corruption
    rr: int = 0  # the worker the merge takes the next sample from
    pos: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.pos = self.pos or [0] * self.streams
        self.delivered = self.delivered or [0] * self.streams
        self.ended = self.ended or [False] * self.streams
        self.skipped = Counter(self.skipped)

    def starts(self) -> list[WorkerStart]:
        return [WorkerStart(p, d) for p, d in zip(self.pos, self.delivered)]

    def consume(self, worker: int, chunk: dict, index: int) -> None:
        self.pos[worker] = chunk["_pos"][index] + 1
        self.delivered[worker] += 1
        self.pads += bool(chunk["pad"][index])
        self.skipped.update(chunk["_skips"][index])

    def finish(self, worker: int, marker: dict) -> None:
        self.ended[worker] = True
        self.pos[worker] = marker["_raw"]
        self.skipped.update(marker["_skips"])

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "samples": self.samples, "pads": self.pads,
                "extra_pads": self.extra_pads, "rr": self.rr, "pos": list(self.pos),
                "delivered": list(self.delivered), "ended": list(self.ended), "skipped": dict(self.skipped)}


_END = object()


class RoundRobinMerge:
    """Takes samples from the workers' chunks in a fixed order: worker rr, rr+1, ... skipping finished ones."""

    def __init__(self, chunks: Iterator[dict], progress: EpochPosition):
        self.chunks, self.progress = chunks, progress
        self.queues = [deque() for _ in range(progress.streams)]

    def _pull(self) -> None:
        chunk = next(self.chunks, None)
        if chunk is None:
            raise RuntimeError("a loader worker stopped without finishing its stream")
        queue = self.queues[chunk["_worker"]]
        if chunk.get("_end"):
            queue.append((_END, chunk))
        else:
            queue.extend((chunk, i) for i in range(len(chunk["_pos"])))

    def next(self) -> Optional[tuple[dict, int]]:
        """The next sample as (chunk, index), or None when every worker has finished."""
        p = self.progress
        while not all(p.ended):
            w = p.rr
            p.rr = (w + 1) % p.streams
            if p.ended[w]:
                continue
            while not self.queues[w]:
                self._pull()
            chunk, index = self.queues[w].popleft()
            if chunk is _END:
                p.finish(w, index)  # `index` holds the end marker
                continue
            p.consume(w, chunk, index)
            return chunk, index
        return None


class Loader:
    """Iterable over the batches of the current epoch (see the module docstring for stages and modes).

    Batch: image uint8 (B, 3, H, W), normalized by the model on its device (ImageEncoder.pixels);
    input_ids, attention_mask long (B, T); sample_id long (B,);
    caption list[str]; label long (B,) (-1 unknown); noise_type long (B,) (0 clean, 1 incorrect,
    2 incomplete, -1 unknown); objects list[list[str]]; pad bool (B,) (True: a repeated sample).
    """

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.epoch = 0
        self._progress: Optional[EpochPosition] = None
        self._resume: Optional[EpochPosition] = None
        self._past_skipped: Counter = Counter()  # skips of the passes before the current one (stats, state)

    # -- epoch and size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a position restored for this same epoch is kept."""
        if self._resume is not None and self._resume.epoch != epoch:
            logger.info("set_epoch(%d) discards the restored position in epoch %d", epoch, self._resume.epoch)
            self._past_skipped.update(self._resume.skipped)
            self._resume = None
        self.epoch = epoch

    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        return plan_resampled(self.spec) if self.spec.resampled else plan_exact(self.spec, epoch)

    @property
    def num_batches(self) -> int:
        """Batches of the current epoch on this rank (all of them, also after a resume mid-epoch)."""
        return self.plan().num_batches

    def __len__(self) -> int:
        return self.num_batches

    # -- iteration

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        if self._resume is None and self._progress is not None:
            self._past_skipped.update(self._progress.skipped)
        progress = self._resume or EpochPosition(self.epoch, self.spec.streams)
        self._resume, self._progress = None, progress
        chunks = self._chunks(WorkerStreams(self.spec, plan, self.epoch, progress.starts()))
        merge, extra = RoundRobinMerge(chunks, progress), None
        try:
            while progress.batches < plan.num_batches:
                size = min(self.spec.batch_size, plan.rank_samples - progress.samples)
                refs = []
                for _ in range(size):
                    ref = merge.next()
                    if ref is None:
                        extra = extra or self._extra_pads(plan, progress)
                        ref = next(extra)
                    refs.append(ref)
                progress.batches, progress.samples = progress.batches + 1, progress.samples + size
                self._check_skip_rate(progress, final=False)
                yield gather(refs, self.spec.pin_memory)
        finally:
            chunks.close()
        self._check_skip_rate(progress, final=True)

    def _chunks(self, streams: WorkerStreams) -> Iterator[dict]:
        if self.spec.workers == 0:
            yield from streams
            return
        # A generator of its own: DataLoader otherwise draws its workers' base seed from the global RNG each
        # time an iterator starts, shifting the trainer's random stream (dropout) differently after a resume.
        # Sample randomness does not depend on it (augmentations are seeded per sample).
        generator = torch.Generator().manual_seed(self.spec.seed)
        loader = DataLoader(streams, batch_size=None, num_workers=self.spec.workers, prefetch_factor=2,
                            generator=generator)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            del iterator  # shuts the worker processes down, also when the epoch is abandoned

    def _extra_pads(self, plan: EpochPlan, progress: EpochPosition) -> Iterator[tuple[dict, int]]:
        """Pads for samples lost to corruption: the good samples of the rank's list (worker 0's shards), read in
        the main process in passes over those shards until the epoch is full. Every pass reads the same samples
        (eval transform), so those consumed before a checkpoint are skipped on resume by count; they are rare."""
        shards = plan.worker_shards[0] if plan.worker_shards else tuple(self.spec.shards)
        spec = replace(self.spec, train=False, resampled=False)
        counter = SkipCounter(f"{spec.split} rank {spec.rank} extra pads")
        task = WorkerTask(pad_shards=shards, pads=max(1, sum(s.num_samples for s in shards)))  # one pass
        used = progress.extra_pads  # before a resume
        while True:
            found = 0
            for record in wds.DataPipeline(*worker_stages(spec, self.epoch, 0, task, counter,
                                                          ResumeCursor(0, counter))):
                found += 1
                if used:
                    used -= 1
                    continue
                progress.extra_pads += 1
                progress.pads += 1
                yield collate([record]), 0
            if not found:
                raise RuntimeError(f"{self.spec.split}: rank {self.spec.rank} found no readable sample in its "
                                   f"shards to fill epoch {self.epoch}")

    def _check_skip_rate(self, progress: EpochPosition, final: bool) -> None:
        """Stop when the skipped share of the samples seen this epoch passes data.max_skip_rate: at the end of
        the epoch, and after every batch once SKIP_CHECK_MIN_SEEN samples were seen (fewer are too noisy)."""
        skipped = sum(progress.skipped.values())
        seen = progress.samples - progress.pads + skipped
        ceiling = self.spec.max_skip_rate
        if not seen or (seen < SKIP_CHECK_MIN_SEEN and not final) or skipped / seen <= ceiling:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(progress.skipped.items()))
        raise SkipRateError(
            f"{self.spec.split} data: {skipped} of {seen} samples skipped ({skipped / seen:.1%}) on rank "
            f"{self.spec.rank} in epoch {progress.epoch} after {progress.batches} batches, above "
            f"data.max_skip_rate={ceiling} ({ceiling:.1%}); by reason: {reasons}. Stopping instead of training on "
            "bad data: repair or remove the shards the warnings name, or raise data.max_skip_rate.")

    # -- position

    def _fingerprint(self) -> dict:
        s = self.spec
        return {"split": s.split, "resampled": s.resampled, "rank": s.rank, "world_size": s.world_size,
                "streams": s.streams, "batch_size": s.batch_size, "seed": s.seed, "num_shards": len(s.shards),
                "shuffle_buffer": s.shuffle_buffer if s.train else 0}

    def state_dict(self) -> dict:
        """The position: epoch, batches consumed, and how far each worker's stream was consumed."""
        progress = self._resume or self._progress or EpochPosition(self.epoch, self.spec.streams)
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), **progress.as_dict(),
                "skipped_before": dict(self._past_skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` with the very next sample at the next iteration (of state's epoch)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mismatch = {k: (v, state["fingerprint"].get(k)) for k, v in self._fingerprint().items()
                    if state["fingerprint"].get(k) != v}
        if mismatch:
            raise ValueError("loader state does not match this loader (now, saved): " +
                             ", ".join(f"{k} {now!r} vs {saved!r}" for k, (now, saved) in mismatch.items()))
        fields = {k: state[k] for k in ("batches", "samples", "pads", "extra_pads", "rr", "pos", "delivered",
                                        "ended", "skipped")}
        self._resume, self._progress = EpochPosition(state["epoch"], self.spec.streams, **fields), None
        self._past_skipped = Counter(state.get("skipped_before", {}))  # absent in states of older versions
        self.epoch = state["epoch"]

    def stats(self) -> dict:
        """This rank's counts. This epoch so far: batches, samples, pad samples (of which `extra_pads` replace
        samples lost to corruption) and `skipped` items by reason (all workers together). `skipped_total`: the
        same over every pass of this loader so far (all epochs, also those before a resume), for
        `data/skipped/<reason>` curves. Sum over ranks for the whole run."""
        p = self._progress or self._resume or EpochPosition(self.epoch, self.spec.streams)
        total = self._past_skipped + p.skipped
        return {"epoch": p.epoch, "batches": p.batches, "samples": p.samples, "pad_samples": p.pads,
                "extra_pads": p.extra_pads, "skipped": dict(sorted(p.skipped.items())),
                "skipped_total": dict(sorted(total.items()))}


# ------------------------------------------------------------------------------------------------ building


def _sources(pattern: str, split: str, resampled: bool) -> tuple[tuple[Shard, ...], ...]:
    sources = []
    for paths in expand_pattern(pattern):
        shards = shard_counts(paths)
        empty = [s for s in shards if s.num_samples == 0]
        if empty:
            logger.warning("data.%s: ignoring %d shards without samples (first: %s)", split, len(empty),
                           empty[0].path)
        sources.append(tuple(s for s in shards if s.num_samples > 0))
    if not any(sources):
        raise ConfigError(f"data.{split}: no samples in {pattern!r}")
    if resampled and not all(sources):
        raise ConfigError(f"data.{split}: a '::' source of {pattern!r} has no samples")
    return tuple(sources)


def _weights(data_cfg, sources, resampled: bool) -> tuple[float, ...]:
    weights = data_cfg.train_weights
    if weights is None:
        return (1.0,) * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"data.train_weights: {len(weights)} weights for {len(sources)} '::' sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.train_weights: {weights} must be non-negative with a positive sum")
    if not resampled:
        logger.info("data.train_weights apply in resampled mode only; exact epochs read every source once")
    return tuple(float(w) for w in weights)


def _check_exact(spec: LoaderSpec) -> None:
    n = len(spec.shards)
    if n < spec.world_size * spec.streams:
        raise ConfigError(
            f"data.{spec.split}: {n} shards cannot feed {spec.world_size} ranks x {spec.streams} workers in "
            f"exact-epoch mode (each worker reads whole shards, so at least {spec.world_size * spec.streams} "
            "are needed); write smaller shards (--shard-size), use fewer workers (data.workers), or set "
            "data.resampled=true")


def build_loader(data_cfg, split: str, *, tokenizer: Tokenizer, image_size: int, batch_size: int, train: bool,
                 context_length: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: Optional[int] = None, pin_memory: bool = False) -> Loader:
    """The loader of `data_cfg.<split>` for one rank. Resampled mode applies to the train split only."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    pattern = getattr(data_cfg, split)
    if not pattern:
        raise ConfigError(f"data.{split} is not set: give a shard pattern or folder")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    resampled = bool(data_cfg.resampled) and split == "train"
    if resampled and not data_cfg.samples_per_epoch:
        raise ConfigError("data.samples_per_epoch: required when data.resampled=true")
    sources = _sources(pattern, split, resampled)
    spec = LoaderSpec(
        split=split, sources=sources, weights=_weights(data_cfg, sources, resampled) if split == "train" else
        (1.0,) * len(sources), tokenizer=tokenizer, image_size=image_size, batch_size=batch_size,
        context_length=context_length, train=train, seed=seed, shuffle_buffer=data_cfg.shuffle_buffer,
        crop_scale_min=data_cfg.crop_scale_min, max_pixels=data_cfg.max_image_pixels,
        max_skip_rate=data_cfg.max_skip_rate, resampled=resampled, samples_per_epoch=data_cfg.samples_per_epoch,
        rank=rank, world_size=world_size, workers=data_cfg.workers if workers is None else workers,
        pin_memory=pin_memory)
    if resampled and plan_resampled(spec).num_batches < 1:
        raise ConfigError(f"data.samples_per_epoch={data_cfg.samples_per_epoch} is less than one global batch "
                         f"({world_size} ranks x {batch_size})")
    if not resampled:
        _check_exact(spec)
    return Loader(spec)
