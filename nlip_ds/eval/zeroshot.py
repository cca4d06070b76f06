"""Zero-shot classification: class prompts from templates, averaged per class, nearest class per image."""
from __future__ import annotations

from pathlib import Path

import torch

from nlip_ds.eval.embed import embed_texts

# The seven-template ensemble the CLIP authors selected for ImageNet (their prompt-engineering notebook),
# plus the plain "a photo of a {}." prompt. A --templates file replaces it.
CLIP_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                  "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def load_class_names(path: str | Path) -> list[str]:
    """One class name per line; line i is class index i."""
    return _lines(Path(path), "class-name")


def load_templates(path: str | Path) -> list[str]:
    """One prompt template per line, each with one {} where the class name goes."""
    templates = _lines(Path(path), "template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"template file {path}: every line needs exactly one {{}}, not {bad[0]!r}")
    return templates


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: list[str], templates: list[str], context_length: int,
                     device, batch_size: int = 256) -> torch.Tensor:
    """(C, D): the normalized mean of each class's normalized prompt embeddings (CLIP's prompt ensemble)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = embed_texts(model, tokenizer, prompts, context_length, batch_size, device)  # (C * T, D)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(emb, dim=-1)


def ranked_classes(image: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(M, C) class indices per image, best first; ties in index order."""
    return (image @ classes.T).argsort(dim=1, descending=True, stable=True)


def zeroshot_accuracy(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy (top-5 only with at least 5 classes) of images against class embeddings.
    A tie between classes goes to the lower class index (a stable sort), so results do not depend on the
    kernel that ran."""
    k = min(5, classes.shape[0])
    topk = ranked_classes(image, classes)[:, :k]  # (M, k)
    hits = topk == labels[:, None]
    out = {"zeroshot_top1": hits[:, 0].float().mean().item()}
    if k == 5:
        out["zeroshot_top5"] = hits.any(dim=1).float().mean().item()
    return out


def per_class_accuracy(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                       class_names: list[str]) -> dict[str, dict]:
    """{class name: {"top1": accuracy, "count": images}} for every class with at least one image."""
    predicted = ranked_classes(image, classes)[:, 0]  # (M,)
    out = {}
    for c, name in enumerate(class_names):
        mine = labels == c
        if mine.any():
            out[name] = {"top1": (predicted[mine] == c).float().mean().item(), "count": int(mine.sum())}
    return out
