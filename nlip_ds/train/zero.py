"""Keep a ZeRO-3 partitioned submodule whole while a loop calls it many times (caption generation).

ZeRO-3 gathers a module's parameters before each of its forwards and frees them after, so a decoder called once
per generated token pays one all-gather per submodule per token. `held(decoder)` gathers once, keeps the
parameters resident through every forward inside (a hold on each parameter stops the post-forward release) and
partitions them again on exit: the loop's forwards then issue no collective for those parameters, and ranks
that run different numbers of steps cannot deadlock on them. It is the caller's context (noise-completion gets it
from the training loop), so the model library never imports DeepSpeed.
"""
from __future__ import annotations

import contextlib

import torch

HOLD = "nlip_ds.train.zero.held"  # marks a parameter as in use by no submodule ZeRO-3 knows, so it stays gathered


def partitioned(module: torch.nn.Module) -> list:
    """The module's ZeRO-3 parameters (empty for a plain module or a lower ZeRO stage)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def held(module: torch.nn.Module):
    """All of `module`'s parameters gathered for the duration; a no-op when none is ZeRO-3 partitioned. Every
    rank must enter and leave together (entry and exit are collectives)."""
    params = partitioned(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(HOLD)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(HOLD)
