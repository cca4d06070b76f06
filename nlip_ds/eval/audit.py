"""`nlip-ds audit`: score every image-text pair of a dataset with trained towers (docs/audit.md).

The score of a pair is what NLIP's noise estimator looks at during training: its contrastive loss against
in-batch negatives (the fused op's per-sample output), and the clean probability that a two-component mixture
fitted on all those losses gives it (`fit_gmm` with the run's noise.* settings). Pairs are read in a fixed
order (shards in listing order, members in tar order) and cut into batches of --batch-size consecutive pairs;
a batch that ends up shorter (the dataset's last one, or one with undecodable samples) takes the first pairs of
batch 0 as extra negatives up to the full size. So a pair's loss depends on the dataset and the batch size
only, never on the number of processes: rank r scores batches r, r + W, ...

Resume: every finished batch is appended as one JSON line to OUT/parts/part-<rank>.jsonl (flushed at once);
a restarted audit, with any number of processes, skips the batches found there. OUT/audit.json records what
the parts were computed from and a restart with another checkpoint, dataset or batch size is refused.

Rank 0 then joins the parts, fits the mixture, writes the scores table (data/scores.py) and report.html
(eval/audit_report.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from nlip_ds.data.samples import NOISE_CODES, SampleError, decode_sample, eval_transform, normalize
from nlip_ds.data.shards import expand_pattern, iter_tar_samples, shard_counts
from nlip_ds.ops import fused_contrastive_loss

logger = logging.getLogger(__name__)

PARTS = "parts"
META = "audit.json"
MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit, as evaluation uses
NOISE_NAMES = {code: name for name, code in NOISE_CODES.items()}


@dataclass
class AuditOptions:
    checkpoint: str
    data: str
    out: Path
    tag: Optional[str] = None
    batch_size: int = 256
    top: int = 48  # pairs shown in the report
    recaption: bool = False
    max_tokens: int = 20
    format: str = "auto"
    device: Optional[str] = None
    precision: str = "fp32"  # weights' dtype (eval/checkpoint.py: load_for_eval); scores in float32

    def check(self) -> None:
        for name in ("batch_size", "top", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: a pair needs in-batch negatives")


# ------------------------------------------------------------------------------------------------ pairs


def raw_pairs(data: str) -> Iterator[tuple[int, Path, dict]]:
    """(index, shard, raw sample) of every sample of the shards of `data`, in the fixed audit order."""
    index = 0
    errors: Counter = Counter()  # a read error ends its shard; iter_tar_samples logs it, naming the shard
    for source in expand_pattern(data):
        for shard in source:
            for raw in iter_tar_samples(shard, errors):
                yield index, shard, raw
                index += 1


def decode_pair(index: int, shard: Path, raw: dict, image_size: int) -> dict:
    """A pair as the loader decodes it (its training caption and id), with the evaluation crop; SampleError."""
    sample = decode_sample(raw, MAX_PIXELS)
    return {"index": index, "sample_id": sample["sample_id"], "shard": str(shard), "key": raw["__key__"],
            "caption": sample["caption"], "noise_type": NOISE_NAMES.get(sample["noise_type"]),
            "image": eval_transform(sample["image"], image_size)}


def batches(data: str, batch_size: int) -> Iterator[tuple[int, list]]:
    """(batch number, [(index, shard, raw), ...]) of consecutive raw samples; the last one may be short."""
    current, number = [], 0
    for item in raw_pairs(data):
        if item[0] // batch_size != number:
            yield number, current
            current, number = [], item[0] // batch_size
        current.append(item)
    if current:
        yield number, current


def expected_batches(data: str, batch_size: int) -> int:
    """Batches the shards' index.json counts promise (for progress and ETA only; the read decides)."""
    total = sum(s.num_samples for source in expand_pattern(data) for s in shard_counts(source))
    return math.ceil(total / batch_size)


# ------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """Per-pair contrastive loss of batches, with batch 0's first pairs as filler negatives."""

    def __init__(self, model, tokenizer, opts: AuditOptions, device):
        self.model, self.tokenizer, self.opts, self.device = model, tokenizer, opts, device
        self.size = model.config.vision.image_size
        self.context = model.config.text.context_length
        self._filler: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @torch.no_grad()
    def embed(self, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(torch.stack([p["image"] for p in pairs])).to(self.device)  # (n, 3, S, S)
        ids, mask = self.tokenizer.encode([p["caption"] for p in pairs], self.context)
        img = self.model.encode_image(images).float()  # (n, D)
        txt = self.model.encode_text(ids.to(self.device), mask.to(self.device)).float()  # (n, D)
        return img, txt

    def filler(self, batch0: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self._filler is None:
            pairs, _ = self.decode(batch0)
            self._filler = self.embed(pairs) if pairs else (None, None)
        return self._filler

    def decode(self, items: list) -> tuple[list[dict], list[tuple[str, str]]]:
        pairs, problems = [], []
        for index, shard, raw in items:
            try:
                pairs.append(decode_pair(index, shard, raw, self.size))
            except SampleError as err:
                problems.append((f"{shard}:{raw.get('__key__')}", str(err)))
        return pairs, problems

    @torch.no_grad()
    def score(self, number: int, items: list, batch0: list) -> dict:
        """One finished batch as the JSON line of the parts file."""
        pairs, problems = self.decode(items)
        rows = []
        if pairs:
            img, txt = self.embed(pairs)
            img_all, txt_all = img, txt
            missing = self.opts.batch_size - len(pairs)
            if missing > 0 and number != 0:
                fill_img, fill_txt = self.filler(batch0)
                if fill_img is not None:  # (N, D): this batch's rows first, then negatives only
                    img_all = torch.cat([img, fill_img[:missing]])
                    txt_all = torch.cat([txt, fill_txt[:missing]])
            _, loss = fused_contrastive_loss(img, txt, img_all, txt_all, self.model.logit_scale().float(), 0)
            rows = [[p["index"], p["sample_id"], p["shard"], p["key"], p["caption"], p["noise_type"], float(v)]
                    for p, v in zip(pairs, loss.cpu().tolist())]
        return {"batch": number, "rows": rows, "problems": problems}


# ------------------------------------------------------------------------------------------------ parts


def _part_path(out: Path, rank: int) -> Path:
    return out / PARTS / f"part-{rank:05d}.jsonl"


def read_parts(out: Path) -> dict[int, dict]:
    """Finished batches found in OUT/parts/ (a line cut by a kill is ignored)."""
    done = {}
    for path in sorted((out / PARTS).glob("part-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            done[entry["batch"]] = entry
    return done


def open_part(out: Path, rank: int):
    """This rank's parts file for appending, cut back to its last complete line first."""
    path = _part_path(out, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with path.open("r+b") as f:
                f.truncate(keep)
    return path.open("a", encoding="utf-8")


def check_meta(out: Path, meta: dict, write: bool) -> None:
    """Refuse to continue parts computed from something else; rank 0 (`write`) records `meta` atomically."""
    path = out / META
    if path.is_file():
        old = json.loads(path.read_text())
        differs = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if differs:
            raise ValueError(f"{out} holds a partial audit of something else ({differs}); use another --out "
                             f"folder or delete {out / PARTS} and {path}")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{META}.tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the pass


class _Eta:
    """Progress of this rank's batches on stderr (rank 0 only), at most every few seconds."""

    def __init__(self, total: int, enabled: bool, interval: float = 5.0):
        self.total, self.enabled, self.interval = max(total, 1), enabled, interval
        self.done, self.pairs, self.start, self.last = 0, 0, time.monotonic(), 0.0

    def step(self, pairs: int) -> None:
        self.done, self.pairs = self.done + 1, self.pairs + pairs
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last, elapsed = now, now - self.start
            eta = elapsed / self.done * max(self.total - self.done, 0)
            print(f"audit: batch {self.done}/{self.total} of this rank, {self.pairs} pairs, "
                  f"{self.pairs / max(elapsed, 1e-9):.1f} pairs/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def score_share(scorer: Scorer, opts: AuditOptions, rank: int, world_size: int) -> int:
    """Score this rank's unfinished batches into its parts file; returns the number of batches read in all."""
    done = set(read_parts(opts.out))
    expected = expected_batches(opts.data, opts.batch_size)
    mine = [b for b in range(expected) if b % world_size == rank and b not in done]
    eta = _Eta(len(mine), rank == 0)
    if done and rank == 0:
        logger.info("resuming: %d batch(es) already scored in %s", len(done), opts.out / PARTS)
    batch0, count = [], 0
    with open_part(opts.out, rank) as part:
        for number, items in batches(opts.data, opts.batch_size):
            batch0 = items if number == 0 else batch0
            count = number + 1
            if number % world_size != rank or number in done:
                continue
            entry = scorer.score(number, items, batch0)
            part.write(json.dumps(entry, ensure_ascii=False) + "\n")
            part.flush()
            eta.step(len(entry["rows"]))
    return count


def joined_rows(out: Path, num_batches: int) -> tuple[dict[str, list], list]:
    """Columns of every scored pair in audit order, and the skipped samples; raises if a batch is missing."""
    done = read_parts(out)
    missing = [b for b in range(num_batches) if b not in done]
    if missing:
        raise RuntimeError(f"audit parts in {out / PARTS} lack {len(missing)} batch(es), e.g. {missing[:5]}")
    names = ("index", "sample_id", "shard", "key", "caption", "noise_type", "loss")
    columns: dict[str, list] = {name: [] for name in names}
    problems = []
    for b in range(num_batches):
        for row in done[b]["rows"]:
            for name, value in zip(names, row):
                columns[name].append(value)
        problems += done[b]["problems"]
    return columns, problems


# ------------------------------------------------------------------------------------------------ the mixture


def noise_flags(noise_types: list) -> torch.Tensor:
    """Ground truth as the noise metrics take it: 1 noisy (incorrect, incomplete), 0 clean, -1 unknown."""
    codes = {"clean": 0, "incorrect": 1, "incomplete": 1}
    return torch.tensor([codes.get(t, -1) for t in noise_types], dtype=torch.long)


def fit_losses(losses: list[float], noise_cfg):
    """The mixture over the audit's losses with training's settings: (GMMFit, clean probability (n,))."""
    from nlip_ds.noise.gmm import fit_gmm

    fit = fit_gmm(torch.tensor(losses, dtype=torch.float64), reg_covar=noise_cfg.reg_covar, tol=noise_cfg.tol,
                  max_iter=noise_cfg.max_iter)
    return fit, 1.0 - fit.posterior.double()


def detection(clean: torch.Tensor, flags: torch.Tensor) -> dict:
    """AUC, precision and recall of "noisy" = clean probability below 0.5, over pairs with ground truth; {}
    unless the ground truth holds both clean and noisy pairs (a clean split: nothing to detect)."""
    from nlip_ds.noise.metrics import detection_auc, detection_precision_recall

    if not (bool((flags == 0).any()) and bool((flags > 0).any())):
        return {}
    noisy = 1.0 - clean
    precision, recall = detection_precision_recall(noisy, flags)
    known = flags[flags >= 0]
    return {"auc": detection_auc(noisy, flags), "precision": precision, "recall": recall,
            "pairs_with_ground_truth": int(known.numel()), "true_noise_rate": float((known > 0).double().mean())}


# ------------------------------------------------------------------------------------------------ the run's own


def run_config(loaded):
    """The run's Config for a run folder (its config.yaml), None for an export (which carries no noise.*)."""
    import yaml

    from nlip_ds.config import from_dict

    if loaded.kind != "run":
        return None
    return from_dict(yaml.safe_load((loaded.folder / "config.yaml").read_text()))


def _same_shards(data: str, train: str) -> bool:
    """Whether every shard of `data` is one of the shards of the run's data.train."""
    try:
        train_shards = {p.resolve() for source in expand_pattern(train) for p in source}
    except (OSError, ValueError):
        return False
    return all(p.resolve() in train_shards for source in expand_pattern(data) for p in source)


def training_estimate(loaded, cfg, data: str, tag: Optional[str]) -> tuple[Optional[dict], str]:
    """({sample id: training-time clean probability}, why) from the checkpoint's last refit, when `data` is
    the run's own training set; (None, why not) otherwise."""
    if cfg is None:
        return None, "an export carries no loss bank"
    if not _same_shards(data, cfg.data.train):
        return None, f"--data is not the run's training set ({cfg.data.train})"
    from nlip_ds.run.checkpoint import CheckpointError, read_latest, read_shared_state
    from nlip_ds.run.layout import RunFolder

    root = RunFolder(loaded.folder).checkpoints
    tag = tag or read_latest(root)
    try:
        state = read_shared_state(root / tag)
    except CheckpointError as exc:
        return None, str(exc)
    noise = state.get("noise") or _sharded_estimate(root / tag, state.get("noise_shards", 0))
    if not len(noise.get("ids", ())):
        return None, f"checkpoint {root / tag} holds no noise estimate yet (no refit before it)"
    clean = (1.0 - noise["eps"].double()).tolist()
    return dict(zip(noise["ids"].tolist(), clean)), f"the last refit saved in {root / tag}"


def _sharded_estimate(folder: Path, shards: int) -> dict:
    """ε by sample id of a noise.state=sharded save: each rank state holds the ids of one rank (disjoint)."""
    from nlip_ds.run.checkpoint import load_rank_state

    parts = [load_rank_state(folder, rank)["noise"]["noise"] for rank in range(shards)]
    if not parts:
        return {}
    return {"ids": torch.cat([p["ids"] for p in parts]), "eps": torch.cat([p["eps"] for p in parts])}


# ------------------------------------------------------------------------------------------------ the report's pairs


def most_suspicious(columns: dict[str, list], top: int, scorer: Scorer, opts: AuditOptions) -> list[dict]:
    """The `top` pairs of lowest clean probability (highest loss first among ties), with their thumbnails and,
    with --recaption, the caption the model's decoder writes for the image."""
    from nlip_ds.eval.audit_report import thumbnail_png

    order = sorted(range(len(columns["loss"])), key=lambda i: (columns["clean_prob"][i], -columns["loss"][i]))
    picked = [{name: values[i] for name, values in columns.items()} for i in order[:top]]
    wanted = {(p["shard"], p["key"]): p for p in picked}
    for shard in dict.fromkeys(p["shard"] for p in picked):
        for raw in iter_tar_samples(Path(shard), Counter()):
            pair = wanted.get((shard, raw["__key__"]))
            if pair is not None:
                try:
                    sample = decode_sample(raw, MAX_PIXELS)
                except SampleError:
                    continue
                pair["png"] = thumbnail_png(sample["image"])
                pair["crop"] = eval_transform(sample["image"], scorer.size)
    if opts.recaption:
        _recaption([p for p in picked if "crop" in p], scorer, opts)
    return picked


@torch.no_grad()
def _recaption(pairs: list[dict], scorer: Scorer, opts: AuditOptions) -> None:
    for start in range(0, len(pairs), opts.batch_size):
        part = pairs[start:start + opts.batch_size]
        images = normalize(torch.stack([p["crop"] for p in part])).to(scorer.device)  # (b, 3, S, S)
        ids = scorer.model.generate(images, strategy="greedy", max_tokens=opts.max_tokens, min_tokens=1)
        for p, text in zip(part, scorer.tokenizer.decode(ids)):
            p["recaption"] = text
