"""Zero-shot classification: class prompts from templates, averaged per class, nearest class per image."""
from __future__ import annotations

from pathlib import Path

import torch


def load_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} does not exist (one class name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file {path} is empty")
    return names


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: list[str], templates: list[str], context_length: int,
                     device) -> torch.Tensor:
    """(C, D): the normalized mean of each class's normalized prompt embeddings (CLIP's prompt ensemble)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    ids, mask = tokenizer.encode(prompts, context_length)
    emb = model.encode_text(ids.to(device), mask.to(device)).float()  # (C * T, D)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def zeroshot_accuracy(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy (top-5 only with at least 5 classes) of images against class embeddings."""
    scores = image @ classes.T  # (M, C)
    k = min(5, classes.shape[0])
    topk = scores.topk(k, dim=1).indices  # (M, k)
    hits = topk == labels[:, None]
    out = {"zeroshot_top1": hits[:, 0].float().mean().item()}
    if k == 5:
        out["zeroshot_top5"] = hits.any(dim=1).float().mean().item()
    return out
