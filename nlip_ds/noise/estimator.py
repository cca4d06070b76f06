"""`NoiseEstimator`: the whole noise side of a training run in one object (docs/noise.md).

It owns the cluster-wide loss bank (bank.py), ε per sample id from the last fit (`NoiseState`, harmonize.py),
the refit schedule, ω = λ·ε and the form of L_NITC (forms.py). The train loop and the task call it here:

    w = noise.weights(ids, flags)               # before the step: ε, ω = λ·ε, clean probability 1 - ε
    loss, l = noise.nitc_loss(..., w.omega)     # in the task's forward: L_NITC in the configured form
    noise.observe(ids, l, flags)                # after the step: one all-gather of (id, loss, flag) rows
    refit = noise.refit_if_due(epoch, step)     # after the step (streaming) / noise.start_epoch(...) (epochs)

With noise.state=replicated every rank holds the identical bank (one all-gather per step), so every rank computes
the identical fit from identical inputs: no broadcast, and the result does not depend on the number of ranks.
With noise.state=sharded every rank keeps, from the same all-gather, only the ids it owns (id mod world size,
partition.py): the bank and ε of 1/world of the samples. A refit is then one distributed fit (gmm_sharded.py) and
ε of a batch comes from the ids' owners in one small exchange per step (`weights`); checkpoints save each rank's
slice in its own rank state (`shard_state_dict`). docs/noise.md, "Sharded state". Logging, plots and files of a
refit belong to the training side (train/refit.py), which receives the `Refit` returned here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from nlip_ds.distributed import all_gather_tensor, all_reduce_max, all_reduce_sum, collective_device, get_world_size
from nlip_ds.noise.bank import UNKNOWN, LossBank
from nlip_ds.noise.forms import nitc_form
from nlip_ds.noise.gmm import GMMFit, fit_gmm
from nlip_ds.noise.gmm_sharded import fit_gmm_sharded
from nlip_ds.noise.harmonize import NoiseState, penalty_term
from nlip_ds.noise.metrics import fit_summary
from nlip_ds.noise.partition import IdPartition
from nlip_ds.ops import fused_contrastive_loss

if TYPE_CHECKING:
    from nlip_ds.config import NoiseConfig

logger = logging.getLogger(__name__)


class NoiseWeights(NamedTuple):
    """Per-sample weights of one batch, each (n,) float32 on the ids' device."""

    epsilon: torch.Tensor  # probability that the pair is noisy; 0 before the first fit
    omega: torch.Tensor  # λ·ε, the weight of L_NITC
    clean_prob: torch.Tensor  # 1 - ε, the weight of the pair in the caption loss


@dataclass
class Refit:
    """What one refit saw and decided, for the training side's logs, plots and files."""

    epoch: int
    step: int
    fit: GMMFit  # fit.posterior is ε, in the order of `ids`
    ids: torch.Tensor  # (k,) int64 ascending; with a sharded state, this rank's ids only
    losses: torch.Tensor  # (k,) float32
    flags: torch.Tensor  # (k,) int8: 1 noisy, 0 clean, -1 unknown
    metrics: dict  # noise/* floats (metrics.fit_summary plus noise/samples)


class EpochSchedule:
    """Refit once at the start of every epoch from noise.warmup_epochs on (epoch 1 at the earliest: there are no
    losses before), on the samples whose loss was last updated in the previous epoch; a resume into an epoch
    whose refit is done does not refit again. The bank's round counter is the epoch."""

    def __init__(self, cfg: "NoiseConfig"):
        self.first_epoch = max(1, cfg.warmup_epochs)

    def at_epoch_start(self, noise: "NoiseEstimator", epoch: int) -> bool:
        """Stamp later bank updates with `epoch`; whether a refit is due now."""
        noise.bank.set_epoch(epoch)
        return epoch >= self.first_epoch and noise.last_refit_epoch < epoch

    def after_step(self, noise: "NoiseEstimator", epoch: int) -> bool:
        return False

    def window_start(self, bank: LossBank) -> int:
        return max(0, bank.epoch - 1)

    def after_fit(self, bank: LossBank) -> None:
        pass


class SampleSchedule:
    """Refit every noise.refit_every samples (all ranks together) once warm-up is over, for streaming data. The
    bank's round counter counts refits; each fit sees the samples updated since the previous one."""

    def __init__(self, cfg: "NoiseConfig"):
        self.every, self.warmup_epochs = cfg.refit_every, cfg.warmup_epochs

    def at_epoch_start(self, noise: "NoiseEstimator", epoch: int) -> bool:
        return False

    def after_step(self, noise: "NoiseEstimator", epoch: int) -> bool:
        return epoch >= self.warmup_epochs and noise.samples_since_refit >= self.every

    def window_start(self, bank: LossBank) -> int:
        return bank.epoch

    def after_fit(self, bank: LossBank) -> None:
        bank.set_epoch(bank.epoch + 1)  # the next window starts now


def refit_schedule(cfg: "NoiseConfig"):
    """The schedule that noise.refit_every selects."""
    return SampleSchedule(cfg) if cfg.refit_every else EpochSchedule(cfg)


class NoiseEstimator:
    """Loss bank, refit schedule, ε/ω per sample and the L_NITC form of one run (cfg: the `noise` section).
    partition: the ids this rank keeps; by default every id (noise.state=replicated) or this rank's slice of the
    process group (sharded)."""

    def __init__(self, cfg: "NoiseConfig", partition: Optional[IdPartition] = None,
                 contrastive_batch: Optional[int] = None):
        """contrastive_batch: the global batch each pair is contrasted against; its ln is the chance loss of the
        trust test (see `trusted`). None: every fit is trusted."""
        self.cfg = cfg
        self.chance_loss = math.log(contrastive_batch) if contrastive_batch and contrastive_batch > 1 else None
        self.form = nitc_form(cfg.nitc_mode)
        self.schedule = refit_schedule(cfg)
        sharded = getattr(cfg, "state", "replicated") == "sharded"
        self.partition = partition or (IdPartition.of_process_group() if sharded else IdPartition())
        self.bank = LossBank(partition=self.partition)  # grows (dense or compact) as ids arrive
        self.estimate = NoiseState()  # the last fit and ε per sample id
        self.epoch = 0  # the current one, from `start_epoch`
        self.last_refit_epoch = -1
        self.samples_since_refit = 0
        self.history: list[dict] = []  # {"epoch", "step", noise/* metrics} per refit

    # ------------------------------------------------------------------------------- every step

    def weights(self, sample_ids: torch.Tensor, flags: Optional[torch.Tensor] = None) -> NoiseWeights:
        """(n,) ids -> ε, ω = λ·ε and 1 - ε on the ids' device (one lookup, no host sync). With a sharded
        state, collective on every rank once a fit exists (every rank passes the same n). flags (n,): the
        batch's ground truth as `observe` takes it, read only by noise.oracle."""
        eps = self._oracle_epsilon(sample_ids, flags) if self.cfg.oracle else self._epsilon(sample_ids)
        return NoiseWeights(eps, self.cfg.lambda_ * eps, 1.0 - eps)

    def _oracle_epsilon(self, sample_ids: torch.Tensor, flags: Optional[torch.Tensor]) -> torch.Tensor:
        """noise.oracle: ε is the data's own label, 1 noisy and 0 clean, from epoch noise.warmup_epochs on; the
        fits still run and are logged, but set nothing. What perfect detection would give at the same budget
        (docs/noise.md, "Oracle"). One host sync per step, to refuse a sample without a label."""
        if flags is None or bool((flags < 0).any()):
            raise ValueError("noise.oracle needs every training sample's noise label (its shard metadata's "
                             "noise_type, as `nlip-ds data synth` and `nlip-ds data digits` write it); this batch "
                             "has samples without one")
        if self.epoch < self.cfg.warmup_epochs:
            return torch.zeros(sample_ids.shape, dtype=torch.float32, device=sample_ids.device)
        return flags.to(device=sample_ids.device, dtype=torch.float32)

    def _epsilon(self, sample_ids: torch.Tensor) -> torch.Tensor:
        if self.partition.replicated or not self.estimate.fitted:  # `fitted` flips on every rank at once
            return self.estimate.epsilon_for(sample_ids)
        n, rank = sample_ids.numel(), self.partition.rank
        everyone = all_gather_tensor(sample_ids.long())  # (world * n,) the step's ids of every rank
        # Each id's ε from its owner; every other rank adds an exact 0 (it does not own the id).
        owned = all_reduce_sum(owned_epsilon(self.estimate, self.partition, everyone))  # (world * n,) float32
        return owned[rank * n:(rank + 1) * n]

    def nitc_loss(self, img_local, txt_local, img_all, txt_all, logit_scale, row_offset: int,
                  omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_NITC of this rank's rows in the form noise.nitc_mode names, and the plain per-sample CLIP loss l
        (n,), detached: what `observe` takes. Arguments as nlip_ds.ops.fused_contrastive_loss; omega (n,)."""
        form = self.form
        if form.op_form is None:
            loss, per_sample = fused_contrastive_loss(img_local, txt_local, img_all, txt_all, logit_scale,
                                                      row_offset)
        else:
            loss, per_sample = fused_contrastive_loss(img_local, txt_local, img_all, txt_all, logit_scale,
                                                      row_offset, omega, form.op_form)
        if form.penalty:
            loss = loss + penalty_term(img_local, txt_local, omega, self.cfg.penalty_mu)
        return loss, per_sample

    def observe(self, sample_ids: torch.Tensor, losses: torch.Tensor, flags: Optional[torch.Tensor] = None) -> None:
        """After each step, on every rank alike (a collective when noise.enabled): this rank's (n,) ids, losses
        and ground-truth flags (1 noisy, 0 clean, -1 unknown) go into every rank's bank by one all-gather."""
        if self.cfg.enabled:
            # Padded repeats (exact epochs) re-enter the bank under their own id: latest wins, no double count.
            # A non-finite loss goes in as a padding row (id -1), so the bank keeps that sample's previous loss.
            self.bank.update(torch.where(torch.isfinite(losses), sample_ids, UNKNOWN), losses, flags=flags)
        self.samples_since_refit += sample_ids.numel() * get_world_size()

    # ------------------------------------------------------------------------------------ refits

    def start_epoch(self, epoch: int, step: int) -> Optional[Refit]:
        """At the start of every epoch (a resumed one too): the bank's round and, when the schedule says so,
        a refit. Returns the refit, or None."""
        self.epoch = epoch
        due = self.schedule.at_epoch_start(self, epoch)
        return self._refit(epoch, step) if due and self.cfg.enabled else None

    def refit_if_due(self, epoch: int, step: int) -> Optional[Refit]:
        """After every step: a refit when the schedule says so (streaming data), else None."""
        if self.cfg.enabled and self.schedule.after_step(self, epoch):
            return self._refit(epoch, step)
        return None

    def _refit(self, epoch: int, step: int) -> Optional[Refit]:
        """GMM on the losses of the schedule's last round -> ε per sample id."""
        ids, losses, flags = self.bank.losses_since(self.schedule.window_start(self.bank))
        total = self._global_count(ids.numel())
        if total < 2:
            logger.warning("noise refit skipped: only %d sample(s) in the bank", total)
            return None
        fit = self._fit(losses)
        reason = self.distrust(fit)
        if reason is None:
            self.estimate.update(fit, ids)
        else:
            self.estimate.clear()
            logger.info("noise refit at epoch %d not used: %s; epsilon is 0 (the CLIP loss) until a fit passes",
                        epoch, reason)
        trusted = reason is None
        metrics = self._summary(fit, losses, flags)  # detection metrics over the samples with ground truth
        metrics["noise/samples"] = float(total)
        metrics["noise/trusted"] = float(trusted)
        self.history.append({"epoch": epoch, "step": step, **metrics})
        self.last_refit_epoch, self.samples_since_refit = epoch, 0
        self.schedule.after_fit(self.bank)
        return Refit(epoch, step, fit, ids, losses, flags, metrics)

    def distrust(self, fit: GMMFit) -> Optional[str]:
        """Why a fit may not set ε, or None when it may (docs/noise.md, "Trust test"). The fit's parameters are
        global, so every rank decides alike with no communication. Two tests:

        - the mean of its clean component, in loss units, must lie below noise.trust_ratio x ln(contrastive
          batch), the loss of a model that cannot tell pairs apart. Before the model has learned anything every
          loss sits near that level, the mixture splits noise from noise, and ε discards pairs at random; under
          reweighting the model learns from the few pairs left, which confirms the fit, and a run at 50% noise
          collapsed to chance accuracy that way. The component mean, not the ε-weighted mean of the losses: ε is
          clamped to rise with the loss, so a fit that calls most pairs noisy puts its clean weight on the lowest
          losses alone, which pass whether or not the model has learned;
        - its noise rate must not exceed noise.max_rate. A fit that calls nearly every pair noisy has a clean
          component made of the low tail of a chance-level distribution, whose mean passes the first test; with
          it, reweighting trains on almost nothing and the next fit says the same.

        A fit that fails leaves ε at 0 (see `_refit`), not at the last passing fit's values: those describe a
        model that no longer exists."""
        if fit.noise_rate > self.cfg.max_rate:
            return (f"it calls {fit.noise_rate:.0%} of the pairs noisy, above noise.max_rate "
                    f"{self.cfg.max_rate:.0%}")
        if self.chance_loss is None:
            return None
        lo, hi = fit.bounds
        clean_mean = lo + fit.means[0] * (hi - lo)
        if clean_mean >= self.cfg.trust_ratio * self.chance_loss:
            return (f"its clean component's mean loss {clean_mean:.2f} is not below {self.cfg.trust_ratio:.2f} x "
                    f"the chance loss ln(batch) = {self.chance_loss:.2f} (noise.trust_ratio)")
        return None

    def _global_count(self, local: int) -> int:
        if self.partition.replicated:
            return local
        return int(all_reduce_sum(torch.tensor([local], device=collective_device())).item())

    def _fit(self, losses: torch.Tensor) -> GMMFit:
        """The mixture of the window's losses (this rank's shard of them when sharded), with ε per loss."""
        n = self.cfg
        options = dict(reg_covar=n.reg_covar, tol=n.tol, max_iter=n.max_iter, init=n.em_init, epsilon=n.epsilon)
        if self.partition.replicated:
            return fit_gmm(losses, **options)
        sharded = fit_gmm_sharded([losses], device=collective_device(), **options)
        return replace(sharded.fit, posterior=sharded.posteriors[0])

    def _summary(self, fit: GMMFit, losses: torch.Tensor, flags: torch.Tensor) -> dict:
        """fit_summary over every rank's samples: a sharded state gathers the (ε, loss, flag) of the samples with
        ground truth (benchmark data only; 24 bytes each) and reduces the mean ε. The AUC ranks by ε, or by the
        loss under noise.epsilon=rank (whose ε is 0 or 1: the ranking it thresholds is the loss's)."""
        by_loss = self.cfg.epsilon == "rank"
        if self.partition.replicated:
            return fit_summary(fit, fit.posterior, flags, scores=losses if by_loss else None)
        known = flags >= 0
        eps, scores, labels = _gather_rows(fit.posterior[known], losses[known], flags[known])
        metrics = fit_summary(fit, eps, labels, scores=scores if by_loss else None)
        device = collective_device()
        sums = all_reduce_sum(torch.tensor([float(fit.posterior.sum()), fit.posterior.numel()],
                                           dtype=torch.float64, device=device)).tolist()
        metrics["noise/mean_eps"] = sums[0] / sums[1]
        return metrics

    # ------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Plain tensors, numbers and lists, identical on every rank. The keys are those that the run's shared
        checkpoint state held before this class existed, so checkpoints of either version resume. A sharded
        state keeps its bank and ε out of it (`shard_state_dict`) and records the number of shards."""
        shared = {"last_refit_epoch": self.last_refit_epoch, "samples_since_refit": self.samples_since_refit,
                  "history": self.history}
        if self.partition.replicated:
            return {"bank": self.bank.state_dict(), "noise": self.estimate.state_dict(), **shared}
        return {"noise_shards": self.partition.world, **shared}

    def shard_state_dict(self) -> Optional[dict]:
        """This rank's slice of a sharded state (its bank, its ε and the fit), for its own checkpoint file;
        None when the state is replicated (state_dict holds all of it)."""
        if self.partition.replicated:
            return None
        return {"rank": self.partition.rank, "world": self.partition.world, "bank": self.bank.state_dict(),
                "noise": self.estimate.state_dict()}

    def shards_needed(self, state: dict) -> list[int]:
        """Which saved shards (ranks of the saving run) `load_state_dict` needs for the shared `state`: none for a
        replicated save, this rank's own at the same partition, every one otherwise (re-partitioning)."""
        saved = state.get("noise_shards")
        if saved is None:
            return []
        if saved == self.partition.world and not self.partition.replicated:
            return [self.partition.rank]
        return list(range(saved))

    def load_state_dict(self, state: dict, shards: Optional[list[dict]] = None) -> None:
        """Restore from a checkpoint's shared `state` and, for a sharded save, the saved shards that
        `shards_needed` names (any world size: the ids this rank owns are kept)."""
        wanted = self.shards_needed(state)
        if wanted:
            got = sorted(s["rank"] for s in shards or [])
            if got != wanted:
                raise ValueError(f"noise state: the checkpoint holds {state['noise_shards']} shards of the noise "
                                 f"state; this rank needs shards {wanted}, got {got}")
            banks, estimates = [s["bank"] for s in shards], [s["noise"] for s in shards]
        else:
            banks, estimates = [state["bank"]], [state["noise"]]
        self.bank.load_shards(banks)
        self.estimate.load_state_dict(self._owned_estimate(estimates))
        self.last_refit_epoch = state["last_refit_epoch"]
        self.samples_since_refit = state["samples_since_refit"]
        self.history = list(state["history"])

    def _owned_estimate(self, states: list[dict]) -> dict:
        """NoiseState's state dict of the ids this rank owns, from one or more saved ones."""
        ids = torch.cat([s["ids"].long() for s in states])
        eps = torch.cat([s["eps"].float() for s in states])
        mine = self.partition.owns(ids)
        ids, eps = ids[mine], eps[mine]
        order = torch.argsort(ids)  # ids are distinct across shards
        return {"ids": ids[order], "eps": eps[order], "fit": states[0]["fit"]}


def owned_epsilon(state: NoiseState, partition: IdPartition, ids: torch.Tensor) -> torch.Tensor:
    """(m,) ids -> ε of those `partition` owns, 0 elsewhere. On the CPU only the owned ids are looked up (1/world
    of them); on an accelerator all of them, because selecting them would sync with the host."""
    if ids.device.type != "cpu":
        return state.epsilon_for(ids)  # ids of other ranks are not in the table: 0
    out = torch.zeros(ids.shape, dtype=torch.float32)
    mine = partition.owns(ids)
    out[mine] = state.epsilon_for(ids[mine])
    return out


def _gather_rows(eps: torch.Tensor, losses: torch.Tensor, flags: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (k_r,) ε, losses and flags, concatenated in rank order (k_r may differ: padded to the
    largest)."""
    device = collective_device()
    longest = all_reduce_max(eps.numel(), device)
    rows = torch.full((longest, 3), -1.0, dtype=torch.float64, device=device)
    k = eps.numel()
    rows[:k, 0], rows[:k, 1], rows[:k, 2] = eps.to(device), losses.to(device), flags.to(device)
    everyone = all_gather_tensor(rows).cpu()
    everyone = everyone[everyone[:, 2] >= 0]
    return everyone[:, 0], everyone[:, 1], everyone[:, 2].to(torch.int8)
