"""Noise estimation and harmonization: `NoiseEstimator` owns the per-sample loss bank, the two-component GMM
refits, ε/ω per sample and the form of L_NITC.

Model-library code: nothing here imports DeepSpeed or nlip_ds.train. See docs/noise.md. The names below load on
first use, so that config.py can import the torch-free `forms` table without importing torch.
"""
import importlib

_HOME = {"LossBank": "bank", "GMMFit": "gmm", "fit_gmm": "gmm", "NoiseState": "harmonize",
         "penalty_term": "harmonize", "NoiseEstimator": "estimator", "Refit": "estimator",
         "NITC_FORMS": "forms", "detection_auc": "metrics", "detection_precision_recall": "metrics",
         "fit_summary": "metrics", "render_fit_histogram": "plots"}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'nlip_ds.noise' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nlip_ds.noise.{_HOME[name]}"), name)
