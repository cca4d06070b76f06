"""Linear probe: multinomial logistic regression on frozen image features (CLIP's linear-probe protocol,
with a fixed inverse regularization strength C instead of CLIP's validation sweep)."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> dict:
    """Fit on (train_x (N, D), train_y (N,)), score on the test set: {"linear_probe_top1": accuracy}.
    Rows labelled -1 (unknown class) are left out of both sets."""
    from sklearn.linear_model import LogisticRegression

    train_keep, test_keep = train_y >= 0, test_y >= 0
    if len(torch.unique(train_y[train_keep])) < 2:
        raise ValueError("linear probe: the training data needs labelled images of at least 2 classes")
    if not test_keep.any():
        raise ValueError("linear probe: the evaluation data has no labelled images")
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(train_x[train_keep].double().numpy(), train_y[train_keep].numpy())
    accuracy = clf.score(test_x[test_keep].double().numpy(), test_y[test_keep].numpy())
    logger.info("linear probe on %d training images: top-1 %.4f", int(train_keep.sum()), accuracy)
    return {"linear_probe_top1": float(accuracy)}
