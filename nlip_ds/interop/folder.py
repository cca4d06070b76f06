"""What every export folder holds besides its weights: the tokenizer as transformers' fast tokenizer, and a
README.md that lists the files, the training run and its git SHA, and what the format leaves out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NO_DECODERS = ("The caption decoder C_d (noise-completion's captioner) and the MAE decoder V_d have no standard "
               "home in this format and are not here; the `nlip` format of the same run holds them "
               "(`nlip-ds export --format nlip`, loaded with `NLIPModel.from_pretrained`).")


@dataclass
class Source:
    """Where an export comes from: the run folder, the checkpoint, the code that trained and exported it."""

    run_dir: str
    checkpoint: str
    train_sha: str
    export_sha: str


def fast_tokenizer(tokenizer_dir: Path, context_length: int):
    """The run's tokenizer folder as a PreTrainedTokenizerFast that truncates at the text context (so
    transformers' and open_clip's `truncation=True` keep [EOS] inside the position embedding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                                   model_max_length=context_length)


def write_readme(out_dir: Path, fmt: str, source: Source, files: dict[str, str], usage: str,
                 notes: tuple[str, ...] = ()) -> Path:
    """README.md of an export folder; `usage` is Markdown that shows how to load it."""
    lines = [f"# NLIP model, `{fmt}` format", "",
             f"Written by `nlip-ds export --format {fmt}` (nlip-ds {source.export_sha}) from the training run "
             f"`{source.run_dir}`, checkpoint `{source.checkpoint}`, trained at git SHA {source.train_sha}.", "",
             "## Files", ""]
    lines += [f"- `{name}`: {what}" for name, what in files.items()]
    lines += ["", "## Loading", "", usage, ""]
    lines += [*(note for n in notes for note in (n, "")), "See docs/export.md of nlip-ds.", ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
