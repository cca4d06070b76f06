"""Run the configured evaluation tasks on a split (used at the end of training and by `nlip-ds eval`)."""
from __future__ import annotations

import logging
from pathlib import Path

from nlip_ds.config import Config
from nlip_ds.eval.features import extract_features
from nlip_ds.eval.retrieval import retrieval_metrics
from nlip_ds.eval.zeroshot import class_embeddings, load_class_names, zeroshot_accuracy

logger = logging.getLogger(__name__)


def default_class_file(cfg: Config) -> Path:
    """classes.txt at the dataset root: the folder above the split folder that data.test names or holds."""
    first = Path(cfg.data.test.split("::")[0])
    split_dir = first if first.is_dir() else first.parent
    return split_dir.parent / "classes.txt"


def run_eval(model, cfg: Config, tokenizer, loader) -> dict:
    device = next(model.parameters()).device
    feats = extract_features(model, loader, device)
    results = {}
    if "zeroshot" in cfg.eval.tasks:
        names = load_class_names(cfg.eval.classes or default_class_file(cfg))
        classes = class_embeddings(model, tokenizer, names, cfg.eval.templates, cfg.model.text.context_length,
                                   device)
        results.update(zeroshot_accuracy(feats.image, classes, feats.label))
    if "retrieval" in cfg.eval.tasks:
        results.update(retrieval_metrics(feats.image, feats.text))
    logger.info("evaluation on %d samples: %s", feats.image.shape[0],
                ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results
