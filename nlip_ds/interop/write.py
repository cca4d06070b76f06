"""Write one NLIPModel in the asked formats: every format is checked before anything is written, so a refused
format leaves no partial export behind. One format goes into the output folder itself, several into one
sub-folder each (out/nlip, out/hf-clip, out/open_clip)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from nlip_ds.interop import FORMATS, hf_clip, openclip
from nlip_ds.interop.folder import NO_DECODERS, Source, write_readme
from nlip_ds.interop.towers import ClipTowers, check_mappable, clip_towers

logger = logging.getLogger(__name__)

NLIP_USAGE = """```python
from nlip_ds.model import NLIPModel
model = NLIPModel.from_pretrained("{dir}")  # tokenizer: nlip_ds.data.tokenizer.load_tokenizer("{dir}/tokenizer")
```"""
NLIP_FILES = {"model.safetensors": "every NLIPModel weight: V_e, T_e, the projections, the logit scale, the "
                                   "caption decoder C_d and (when trained) the MAE decoder V_d",
              "config.json": "the run's model config, vocabulary size and special token ids",
              "tokenizer/": "the run's tokenizer (transformers' AutoTokenizer loads it)"}
HF_NOTE = ("The towers map one to one: the image tower is CLIP's ViT (model.vision.layout=clip), the text "
           "tower is transformers' CLIPTextModel read at [EOS]; logit_scale is log of the scale the model applies "
           "(clamped at model.logit_scale_max).")


def check_formats(model, formats: list[str]) -> list[str]:
    """The formats without repeats, in order; raises ValueError naming an unknown one, ExportRefused naming the
    config option that keeps a format from mapping exactly."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--format: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    formats = list(dict.fromkeys(formats))
    for fmt in formats:
        if fmt != "nlip":
            check_mappable(model.config.vision, model.vision.vit, fmt)
    return formats


def default_open_clip_name(run_dir: str) -> str:
    return "nlip-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(run_dir).resolve().name)


def _write_nlip(model, towers, folder: Path, tokenizer_dir: Path, source: Source, name: str) -> None:
    model.save_pretrained(folder, tokenizer_dir=tokenizer_dir)
    write_readme(folder, "nlip", source, NLIP_FILES, NLIP_USAGE.format(dir=folder.resolve()))


def _write_hf(model, towers: ClipTowers, folder: Path, tokenizer_dir: Path, source: Source, name: str) -> None:
    hf_clip.write_hf_clip(towers, folder, tokenizer_dir)
    write_readme(folder, "hf-clip", source, hf_clip.FILES, hf_clip.USAGE.replace("{dir}", str(folder.resolve())),
                 (HF_NOTE, NO_DECODERS))


def _write_open_clip(model, towers: ClipTowers, folder: Path, tokenizer_dir: Path, source: Source,
                     name: str) -> None:
    openclip.write_open_clip(towers, folder, tokenizer_dir, name)
    usage = openclip.USAGE.format(dir=folder.resolve(), name=name, weights=openclip.WEIGHTS)
    write_readme(folder, "open_clip", source, openclip.files(name), usage, (HF_NOTE, NO_DECODERS))


WRITERS = {"nlip": _write_nlip, "hf-clip": _write_hf, "open_clip": _write_open_clip}


def write_exports(model, tokenizer_dir: str | Path, out_dir: str | Path, formats: list[str], source: Source,
                  open_clip_name: str | None = None) -> dict[str, Path]:
    """{format: folder written}. `model` is an NLIPModel with its weights on the CPU."""
    formats = check_formats(model, formats)
    towers = clip_towers(model) if set(formats) - {"nlip"} else None
    out_dir = Path(out_dir)
    name = open_clip_name or default_open_clip_name(source.run_dir)
    written = {}
    for fmt in formats:
        folder = out_dir if len(formats) == 1 else out_dir / fmt
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("writing the %s export to %s", fmt, folder)
        WRITERS[fmt](model, towers, folder, Path(tokenizer_dir), source, name)
        written[fmt] = folder
    return written
