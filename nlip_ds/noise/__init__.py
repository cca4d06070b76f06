"""Noise estimation and harmonization: the per-sample loss bank, the two-component GMM, ω for L_NITC.

Model-library code: nothing here imports DeepSpeed. See docs/noise.md.
"""
from nlip_ds.noise.bank import LossBank
from nlip_ds.noise.gmm import GMMFit, fit_gmm
from nlip_ds.noise.harmonize import NoiseState, penalty_term
from nlip_ds.noise.metrics import detection_auc, detection_precision_recall, fit_summary
from nlip_ds.noise.plots import render_fit_histogram

__all__ = ["GMMFit", "LossBank", "NoiseState", "detection_auc", "detection_precision_recall", "fit_gmm",
           "fit_summary", "penalty_term", "render_fit_histogram"]
