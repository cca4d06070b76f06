"""World sizes 1, 2 and 4 under DeepSpeed ZeRO-3 (gloo, CPU) on the same global batch must give the same global
loss, the same consolidated gradients and the same noise estimate, and ZeRO-3 must really partition. The engine
gathers parameters per transformer layer (engine.gather_by_layer); a 2-rank run that hooks every submodule
instead (the engine JSON's own leaf_module section) must give the same gradients.

Each world size runs in its own group of spawned processes; rank 0 writes what it saw to a file and the test
compares the files.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from nlip_ds.distributed import free_port

GLOBAL_BATCH = 16
VOCAB = 64


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(5, VOCAB, (GLOBAL_BATCH, 12), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # BOS ... EOS
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "sample_id": torch.arange(GLOBAL_BATCH),
            # a concept prefix: T_e then runs twice with gradients (caption, prefix), which ZeRO-3 must survive
            "concept_ids": torch.randint(5, VOCAB, (GLOBAL_BATCH, 4), generator=g),
            "noise_type": torch.zeros(GLOBAL_BATCH, dtype=torch.long),
            "pad": torch.zeros(GLOBAL_BATCH, dtype=torch.bool)}


def _worker(rank: int, world: int, port: int, out: str, per_submodule: bool = False) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from nlip_ds import distributed as D
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel
    from nlip_ds.noise.gmm import fit_gmm
    from nlip_ds.train import engine as E
    from nlip_ds.train.task import NLIPTask

    n = GLOBAL_BATCH // world
    cfg = load_config("configs/tiny-cpu.yaml", ["model.text.concept_dropout=0", "model.decoder.dropout=0",
                                                f"train.micro_batch_size={n}",
                                                "monitor.tensorboard=false", "optim.warmup_steps=0"])
    E.init_distributed(cfg)
    ds = E.build_ds_config(cfg, world)
    if per_submodule:
        ds["zero_optimization"]["leaf_module"] = {"classes": []}
    batch = {k: v[rank * n:(rank + 1) * n] for k, v in _global_batch().items()}
    eps = torch.linspace(0.0, 0.9, GLOBAL_BATCH)[rank * n:(rank + 1) * n]  # exercises omega and LM weights
    plain_grads = None
    if world == 1:  # the same step without DeepSpeed, which every ZeRO-3 run must reproduce
        torch.manual_seed(0)
        plain = NLIPTask(NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2, sep_id=3), cfg)
        plain(batch, 0.5 * eps, 1.0 - eps)["loss"].backward()
        plain_grads = {name: p.grad.clone() for name, p in plain.named_parameters()}
    torch.manual_seed(0)
    model = NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    engine = E.initialize(NLIPTask(model, cfg), cfg, ds, total_steps=10)
    leaves = sum(bool(getattr(m, "_z3_leaf", False)) for m in engine.module.modules())
    leaf_names = [name + "." for name, m in engine.module.named_modules() if getattr(m, "_z3_leaf", False)]
    hooked = {name: (bool(m._forward_pre_hooks), next(m.parameters(recurse=name + "." in leaf_names), None) is not None)
              for name, m in engine.module.named_modules() if name and not any(name.startswith(l) for l in leaf_names)}
    terms = engine(batch, 0.5 * eps, 1.0 - eps)
    engine.backward(terms["loss"])
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    partitioned = {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in engine.module.named_parameters()}
    engine.step()
    loss = terms["loss"].detach().clone()
    torch.distributed.all_reduce(loss)
    per_sample = D.all_gather_tensor(terms["per_sample_loss"])
    if rank == 0:
        fit = fit_gmm(per_sample.double())
        torch.save({"loss": loss / world, "grads": grads, "per_sample": per_sample, "eps": fit.posterior,
                    "partitioned": partitioned, "leaves": leaves, "plain_grads": plain_grads, "hooked": hooked},
                   out)
    D.leave_process_group()  # left to exit-time destructors, gloo's threads can abort the rank (std::terminate)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world in (1, 2, 4):
        path = str(tmp_path_factory.mktemp(f"ws{world}") / "result.pt")
        mp.spawn(_worker, args=(world, free_port(), path), nprocs=world, join=True)
        out[world] = torch.load(path, weights_only=True)
    path = str(tmp_path_factory.mktemp("ws2-per-submodule") / "result.pt")
    mp.spawn(_worker, args=(2, free_port(), path, True), nprocs=2, join=True)
    out["per_submodule"] = torch.load(path, weights_only=True)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4, "per_submodule"])
def test_same_loss_gradients_and_noise_estimate(results, world):
    ref, got = results[1], results[world]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["per_sample"], ref["per_sample"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["eps"], ref["eps"], rtol=1e-4, atol=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.dist
def test_zero3_gradients_equal_the_plain_pytorch_step(results):
    ref = results[1]
    assert ref["plain_grads"].keys() == ref["grads"].keys()
    for name, g in ref["plain_grads"].items():
        torch.testing.assert_close(ref["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.dist
def test_zero3_partitions_every_large_parameter(results):
    for world in (2, 4):
        for name, (local, full) in results[world]["partitioned"].items():
            if full >= 10_000:  # below stage3_param_persistence_threshold parameters stay whole by design
                assert local <= -(-full // world), f"{name}: rank 0 holds {local} of {full} elements"


@pytest.mark.dist
def test_zero3_gathers_whole_transformer_layers_unless_the_json_says_otherwise(results):
    layers = 2 * 3  # tiny config: 2 layers each in V_e, T_e and C_d
    assert [results[w]["leaves"] for w in (1, 2, 4)] == [layers] * 3
    assert results["per_submodule"]["leaves"] == 0


@pytest.mark.dist
def test_zero3_hooks_only_modules_that_hold_parameters(results):
    """engine.unhook_parameterless_modules: DeepSpeed's gather hooks stay on every module (or leaf) with parameters
    and come off the rest (dropouts, containers, activations), whose gathers had nothing to do."""
    for key in (1, 2, "per_submodule"):
        hooked = results[key]["hooked"]
        with_params = {name for name, (_, params) in hooked.items() if params}
        assert with_params and {name for name, (hook, _) in hooked.items() if hook} == with_params, key
        assert len(hooked) > len(with_params), key  # the tiny model has parameterless modules to unhook
