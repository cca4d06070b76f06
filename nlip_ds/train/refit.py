"""The training side of a noise refit: its metrics into the sink, plots into TensorBoard, its data into a file.

The refit itself (schedule, GMM on the bank, ε per sample id) is the NoiseEstimator's (nlip_ds/noise/estimator.py,
docs/noise.md); it hands each one over as a `Refit`.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from nlip_ds.config import Config
from nlip_ds.monitor import MetricSink
from nlip_ds.noise.estimator import Refit
from nlip_ds.run.layout import RunFolder

logger = logging.getLogger(__name__)


def report_refit(cfg: Config, sink: MetricSink, refit: Optional[Refit]) -> None:
    """Log, plot and (monitor.save_refit_data) save `refit`; nothing when it is None (no refit was due)."""
    if refit is None:
        return
    sink.log(refit.metrics, refit.step)
    if sink.enabled and cfg.monitor.save_refit_data:
        _save_refit_data(cfg, refit)
    if sink.enabled and cfg.monitor.histogram_every_refit:
        from nlip_ds.noise.plots import render_fit_histogram

        sink.histogram("noise/per_sample_loss", refit.losses, refit.step)
        sink.histogram("noise/epsilon", refit.fit.posterior, refit.step)
        sink.image("noise/loss_histogram_fit", render_fit_histogram(refit.fit, refit.losses, refit.flags),
                   refit.step)
    metrics = refit.metrics
    auc = f", AUC {metrics['noise/auc']:.3f}" if "noise/auc" in metrics else ""
    logger.info("noise refit at epoch %d on %d samples: estimated noise rate %.3f%s", refit.epoch,
                int(metrics["noise/samples"]), metrics.get("noise/rate", float("nan")), auc)


def _save_refit_data(cfg: Config, refit: Refit) -> None:
    """RUN/noise/refit_e<epoch>_s<step>.pt: what this fit saw and decided, loadable with weights_only=True
    (benchmarks/noise_robustness.py draws its histograms and ROC curves from these)."""
    out = RunFolder.of(cfg).refit_data(refit.epoch, refit.step)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"epoch": refit.epoch, "step": refit.step, "fit": refit.fit.state_dict(), "ids": refit.ids.cpu(),
              "losses": refit.losses.float().cpu(), "flags": refit.flags.to(torch.int8).cpu(),
              "epsilon": refit.fit.posterior.float().cpu()}
    tmp = out.with_suffix(".pt.tmp")
    torch.save(record, tmp)
    os.replace(tmp, out)
