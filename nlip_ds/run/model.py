"""A trained model straight from a run folder: the ZeRO shards of one checkpoint consolidated in memory.

The one DeepSpeed import of nlip_ds/run/ is here, in the function that needs it: DeepSpeed's zero_to_fp32 is
the reader of the sharded format its engine writes. It reads files only (no engine, no process group), so
`nlip-ds eval`, `caption` and `export` load a run on one process.
"""
from __future__ import annotations

import logging
from pathlib import Path

from nlip_ds.run.checkpoint import read_latest, verify_checkpoint
from nlip_ds.run.layout import RunFolder, checkpoint_root, read_config

logger = logging.getLogger(__name__)


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(NLIPModel with the consolidated fp32 weights, the run's Config, the checkpoint folder of `tag`).

    `run_dir` is a run folder or its checkpoints/ folder; `tag` a checkpoint folder name (default: `latest`).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nlip_ds.data.tokenizer import load_tokenizer
    from nlip_ds.model import NLIPModel

    root = checkpoint_root(run_dir)
    run = RunFolder(root.parent)
    cfg = read_config(run)
    tag = tag or read_latest(root)
    verify_checkpoint(root / tag)  # a clear error naming a missing or truncated file
    logger.info("consolidating %s/%s", root, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    weights = {k.removeprefix("model."): v for k, v in state.items()}  # the task module holds the model
    tok = load_tokenizer(cfg.data.tokenizer)
    model = NLIPModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                      eos_id=tok.eos_id, sep_id=tok.sep_id)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model of {run.config}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, cfg, root / tag
