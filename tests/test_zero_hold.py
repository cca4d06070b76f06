"""train/zero.py's `held`: under ZeRO-3 on two ranks, generation inside it gathers C_d's parameters once per
call (the count of all-gathers does not grow with the caption length, while without it grows per token), gives
the same captions, and leaves the parameters partitioned again."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys, torch, deepspeed
import deepspeed.comm as dcomm
sys.path.insert(0, {tests!r})
from test_model import SPECIAL, make_batch, tiny_config
from nlip_ds.model import NLIPModel
from nlip_ds.train.zero import held

deepspeed.init_distributed(dist_backend="gloo")
ds = {{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}}}}
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = NLIPModel(tiny_config(), init_weights=False, **SPECIAL)
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    torch.manual_seed(0)
    model.init_weights()
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.param_groups(0.1), lr=1e-3),
                                  config=ds)
engine.eval()
gathers = [0]
for name in ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_gather_coalesced"):
    if hasattr(dcomm, name):
        def counting(*args, _orig=getattr(dcomm, name), **kwargs):
            gathers[0] += 1
            return _orig(*args, **kwargs)
        setattr(dcomm, name, counting)
rank = dcomm.get_rank()
batch = make_batch()
images, concepts = batch["image"][: 1 + rank], batch["concept_ids"][: 1 + rank]  # ranks hold different counts
counts, captions = {{}}, {{}}
for hold in (False, True):
    for tokens in (4, 12):
        gathers[0] = 0
        with torch.no_grad(), (held(engine.module.decoder) if hold else torch.no_grad()):
            captions[hold, tokens] = engine.module.generate(images, concepts, strategy="greedy", max_tokens=tokens,
                                                            min_tokens=tokens)
        counts[hold, tokens] = gathers[0]
assert counts[False, 12] > counts[False, 4] > 0, counts  # the count sees the per-token gathers
assert counts[True, 12] == counts[True, 4], counts  # held: none per token
assert all(torch.equal(captions[False, t], captions[True, t]) for t in (4, 12))
assert all(p.numel() == 0 for p in engine.module.decoder.parameters())  # partitioned again
print("HOLD-OK", rank, counts, flush=True)
"""


@pytest.mark.dist
def test_held_decoder_is_gathered_once_per_generate_call():
    pytest.importorskip("deepspeed")
    script = SCRIPT.format(tests=str(REPO / "tests"))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"HOLD-OK {rank}" in out, out[-4000:]
