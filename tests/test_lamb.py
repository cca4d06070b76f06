"""LAMB's trust ratio is per parameter tensor, also under ZeRO-3 where the optimizer sees flat partitions.

- fast: `Lamb` on whole tensors equals a plain per-tensor LAMB written here; ZeRO-2 and optimizer offload are
  refused with LAMB before any work.
- dist: under ZeRO-3 (gloo, float32) at world sizes 1, 2 and 4 the weights after a few steps equal the plain
  reference's; without the partition layout (the trust ratio of a rank's whole flat partition) they do not.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from nlip_ds.config import ConfigError, load_config
from nlip_ds.distributed import free_port

STEPS, GLOBAL_BATCH, LR, WD = 3, 8, 0.05, 0.1


class Net(torch.nn.Module):
    """Odd tensor sizes (91, 13, 65, 5, 33 elements) so partitions split tensors unevenly and need padding."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.table = torch.nn.Parameter(torch.randn(11, 3))

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).pow(2).mean() + self.table[rows].sin().sum(-1).mean()  # per-row means


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _groups(net: Net, wd: float) -> list[dict]:
    return [{"params": [net.a.weight, net.b.weight], "weight_decay": wd},
            {"params": [net.a.bias, net.b.bias, net.table], "weight_decay": 0.0}]


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)


def reference_lamb(net: Net, steps: int) -> dict:
    """Per-tensor LAMB, plainly: Adam moments with bias correction, decoupled weight decay inside the update, and
    each tensor's update scaled by ||w|| / ||update||."""
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    state = {}
    for step in range(1, steps + 1):
        net.zero_grad()
        net(*_batch(step)).backward()
        with torch.no_grad():
            for group in _groups(net, WD):
                for p in group["params"]:
                    m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
                    m.copy_(beta1 * m + (1 - beta1) * p.grad)
                    v.copy_(beta2 * v + (1 - beta2) * p.grad ** 2)
                    update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
                    update = update + group["weight_decay"] * p
                    ratio = p.norm() / update.norm() if p.norm() > 0 and update.norm() > 0 else 1.0
                    p -= LR * ratio * update
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def test_whole_tensor_lamb_equals_the_plain_reference():
    from nlip_ds.train.optim import Lamb

    want = reference_lamb(_net(), STEPS)
    net = _net()
    opt = Lamb(_groups(net, WD), lr=LR, weight_decay=WD)
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        net(*_batch(step)).backward()
        opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.config=ds_configs/zero2.json"], "lamb needs ZeRO stage 3.*zero3.json"),
    (["deepspeed.config=ds_configs/zero3_offload.json"], "lamb does not support optimizer offload.*zero3.json"),
])
def test_lamb_with_zero2_or_offload_is_refused(overrides, message):
    from nlip_ds.train import engine as E

    cfg = load_config("configs/tiny-cpu.yaml", ["optim.name=lamb", *overrides])
    with pytest.raises(ConfigError, match=f"optim.name: {message}"):
        E.check_engine_options(cfg)


def _worker(rank: int, world: int, port: int, out: str, layout: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from nlip_ds.train.optim import Lamb

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    net = _net()
    opt = Lamb(_groups(net, WD), lr=LR, weight_decay=WD)
    n = GLOBAL_BATCH // world
    ds = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": n, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=ds)
    if layout:
        opt.use_zero3_layout(engine.optimizer)
    for step in range(1, STEPS + 1):
        x, rows = _batch(step)
        # the engine averages gradients over ranks: each rank's mean over its rows gives the global mean
        loss = engine(x[rank * n:(rank + 1) * n], rows[rank * n:(rank + 1) * n])
        engine.backward(loss)
        engine.step()
    weights = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(weights, out)
    from nlip_ds.distributed import leave_process_group

    leave_process_group()  # left to exit-time destructors, gloo's threads can abort the rank (std::terminate)


def _zero3_weights(tmp_path, world: int, layout: bool = True) -> dict:
    path = str(tmp_path / f"ws{world}_{layout}.pt")
    mp.spawn(_worker, args=(world, free_port(), path, layout), nprocs=world, join=True)
    return torch.load(path, weights_only=True)


@pytest.mark.dist
def test_zero3_lamb_update_is_per_tensor_at_world_sizes_1_2_4(tmp_path):
    want = reference_lamb(_net(), STEPS)
    for world in (1, 2, 4):
        got = _zero3_weights(tmp_path, world)
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=f"world size {world}: {name}")
    flat = _zero3_weights(tmp_path, 2, layout=False)  # the trust ratio of each rank's flat partition
    assert any(not torch.allclose(flat[name], w, rtol=1e-3, atol=1e-4) for name, w in want.items())
