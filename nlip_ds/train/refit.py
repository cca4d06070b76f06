"""The noise estimator's refit: GMM on the bank's losses of the last epoch -> epsilon per sample id.

Every rank holds the identical bank (one all-gather per step), so every rank computes the identical fit from
identical inputs: no broadcast, and the result does not depend on the number of ranks.
"""
from __future__ import annotations

import logging
import os

import torch

from nlip_ds.config import Config
from nlip_ds.monitor import MetricSink
from nlip_ds.noise.gmm import fit_gmm
from nlip_ds.noise.metrics import fit_summary
from nlip_ds.run.layout import RunFolder
from nlip_ds.train.state import RunState

logger = logging.getLogger(__name__)


def refit(cfg: Config, state: RunState, sink: MetricSink) -> dict:
    """Fit on the samples whose loss was last updated in the previous round (epoch, or refit window)."""
    since = max(0, state.bank.epoch - 1) if not cfg.noise.refit_every else state.bank.epoch
    ids, losses, flags = state.bank.losses_since(since)
    if ids.numel() < 2:
        logger.warning("noise refit skipped: only %d sample(s) in the bank", ids.numel())
        return {}
    n = cfg.noise
    fit = fit_gmm(losses, reg_covar=n.reg_covar, tol=n.tol, max_iter=n.max_iter)
    state.noise.update(fit, ids)
    metrics = fit_summary(fit, fit.posterior, flags)  # detection metrics over the samples with ground truth
    metrics["noise/samples"] = float(ids.numel())
    state.history.append({"epoch": state.epoch, "step": state.step, **metrics})
    state.last_refit_epoch = state.epoch
    state.samples_since_refit = 0
    if cfg.noise.refit_every:
        state.bank.set_epoch(state.bank.epoch + 1)  # the next window starts now
    _log_refit(cfg, state, sink, fit, ids, losses, flags, metrics)
    return metrics


def _log_refit(cfg: Config, state: RunState, sink: MetricSink, fit, ids, losses, flags, metrics: dict) -> None:
    sink.log(metrics, state.step)
    if sink.enabled and cfg.monitor.save_refit_data:
        _save_refit_data(cfg, state, fit, ids, losses, flags)
    if sink.enabled and cfg.monitor.histogram_every_refit:
        from nlip_ds.noise.plots import render_fit_histogram

        sink.histogram("noise/per_sample_loss", losses, state.step)
        sink.histogram("noise/epsilon", fit.posterior, state.step)
        sink.image("noise/loss_histogram_fit", render_fit_histogram(fit, losses, flags), state.step)
    auc = f", AUC {metrics['noise/auc']:.3f}" if "noise/auc" in metrics else ""
    logger.info("noise refit at epoch %d on %d samples: estimated noise rate %.3f%s", state.epoch,
                losses.numel(), metrics.get("noise/rate", float("nan")), auc)


def _save_refit_data(cfg: Config, state: RunState, fit, ids, losses, flags) -> None:
    """RUN/noise/refit_e<epoch>_s<step>.pt: what this fit saw and decided, loadable with weights_only=True
    (benchmarks/noise_robustness.py draws its histograms and ROC curves from these)."""
    out = RunFolder.of(cfg).refit_data(state.epoch, state.step)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"epoch": state.epoch, "step": state.step, "fit": fit.state_dict(), "ids": ids.cpu(),
              "losses": losses.float().cpu(), "flags": flags.to(torch.int8).cpu(),
              "epsilon": fit.posterior.float().cpu()}
    tmp = out.with_suffix(".pt.tmp")
    torch.save(record, tmp)
    os.replace(tmp, out)
