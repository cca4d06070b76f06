"""NLIPModel against ZeRO-3's rule that a parameter exists only inside the forward of the module that owns it.

Two checks. A simulation without DeepSpeed empties every parameter except while its own module's forward runs
(what ZeRO-3 does on a multi-rank run), so any read from outside, by our code or the libraries', fails. Then
a real DeepSpeed ZeRO-3 engine on one CPU rank: the model built under zero.Init with every parameter
partitioned (persistence threshold 0), initialized the documented way, runs forward, backward and a step, and
encode_image / encode_text / generate give exactly what the plain model gives with the same weights. A
single rank cannot show a misplaced read (DeepSpeed materializes everything there), hence the simulation.
The DeepSpeed run is a subprocess so its process group does not leak into other tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlip_ds.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys, torch, deepspeed
sys.path.insert(0, {tests!r})
from test_model import SPECIAL, make_batch, tiny_config
from nlip_ds.model import NLIPModel, caption_loss

deepspeed.init_distributed(dist_backend="gloo")
ds = {{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}}}}
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = NLIPModel(tiny_config(), init_weights=False, **SPECIAL)
assert all(p.numel() == 0 for p in model.parameters())  # partitioned, not a silently replicated model
reference = torch.load({weights!r})
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    model.init_weights()  # the documented zero.Init path must run while partitioned ...
    model.load_state_dict(reference)  # ... then take the reference weights for the comparison
expected = torch.load({expected!r})
batch = make_batch()
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.param_groups(0.1), lr=1e-3),
                                  config=ds)
engine.eval()
with torch.no_grad():
    out = engine(batch)
    for key in ("image_features", "text_features", "caption_logits"):
        torch.testing.assert_close(out[key], expected[key])
    torch.testing.assert_close(engine.module.encode_image(batch["image"]), expected["image_features"])
    text = engine.module.encode_text(batch["input_ids"], batch["attention_mask"])  # the embedding: caption alone
    torch.testing.assert_close(text, expected["text_features"])
    for strategy in ("greedy", "beam"):
        captions = engine.module.generate(batch["image"], batch["concept_ids"], strategy=strategy, max_tokens=6)
        assert torch.equal(captions, expected[strategy]), strategy
engine.train()
out = engine(batch)
loss = caption_loss(out["caption_logits"], out["caption_labels"])[0] + out["mae_loss"].mean()
loss = loss - out["logit_scale"] * (out["image_features"] * out["text_features"]).sum(1).mean()
engine.backward(loss)
engine.step()
print("ZERO3-OK")
"""


class OwnForwardOnly:
    """Keeps each parameter empty except while the forward of the module that owns it runs."""

    def __init__(self, model: torch.nn.Module):
        self.stash = {}
        for module in model.modules():
            module.register_forward_pre_hook(lambda m, args: self.show(m))
            module.register_forward_hook(lambda m, args, out: self.hide(m))
            self.hide(module)

    def hide(self, module):
        for param in module.parameters(recurse=False):
            self.stash[id(param)] = param.data
            param.data = torch.empty(0, dtype=param.dtype)

    def show(self, module):
        for param in module.parameters(recurse=False):
            param.data = self.stash[id(param)]


@pytest.mark.parametrize("training", [True, False])
def test_parameters_are_read_only_inside_their_own_module(training):
    sys.path.insert(0, str(REPO / "tests"))
    from test_model import build, make_batch

    model = build().train(training)
    batch = make_batch()
    OwnForwardOnly(model)
    with torch.no_grad():  # autograd would keep references to the real tensors
        out = model(batch)
        assert ("mae_loss" in out) == training
        model.encode_image(batch["image"])
        model.encode_text(batch["input_ids"], batch["attention_mask"], batch["concept_ids"])
        for strategy in ("greedy", "nucleus", "beam"):
            model.generate(batch["image"], batch["concept_ids"], strategy=strategy, max_tokens=4)


def test_model_runs_partitioned_under_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(REPO / "tests"))
    from test_model import build, make_batch

    model = build().eval()
    batch = make_batch()
    with torch.no_grad():
        expected = {k: v for k, v in model(batch).items()}
        for strategy in ("greedy", "beam"):
            expected[strategy] = model.generate(batch["image"], batch["concept_ids"], strategy=strategy,
                                                max_tokens=6)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = SCRIPT.format(tests=str(REPO / "tests"), weights=str(tmp_path / "weights.pt"),
                           expected=str(tmp_path / "expected.pt"))
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ZERO3-OK" in result.stdout, (result.stdout + result.stderr)[-4000:]
