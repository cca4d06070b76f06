"""Mixed precision end to end: every floating input reaches each module in that module's dtype, and the losses
keep float32 statistics.

- fast: an NLIPModel cast to bf16 trains a step, embeds and captions from uint8 or float32 images; uint8 images
  normalized inside the model give exactly the float32 loader's result; an exported model runs in bf16 close to
  fp32; fp16 is refused on CPU; an fp16 loss-scaler skip is counted apart from non-finite skips.
- slow + dist: bf16 under ZeRO-3 at world sizes 1 and 2 on the same global batch agree within the bf16 tolerance
  below; a 2-rank `deepspeed` bf16 run has a falling loss and a noise refit, resumes exactly from a checkpoint,
  and its export evaluates.

bf16 tolerance: a bf16 weight holds 8 significant bits (relative spacing 2^-8 = 0.4%). Runs that differ only in
the order of float32 reductions (world size 1 vs 2) round some weights to the neighbouring bf16 value, so their
losses agree to BF16_RTOL = 2e-2 over a few steps, not bitwise. A resume replays the same operations from the
same fp32 master weights and optimizer state, so it is exact up to float32 reduction noise (rel 1e-5).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nlip_ds.config import ConfigError, load_config
from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BF16_RTOL = 2e-2
UPDATE_RTOL = 0.1  # measured 0.02 (bf16, 3 AdamW steps)
GLOBAL_BATCH, VOCAB, STEPS = 16, 64, 3


def _tiny_cfg(*overrides: str):
    return load_config("configs/tiny-cpu.yaml", ["model.text.concept_dropout=0", "model.decoder.dropout=0",
                                                 "monitor.tensorboard=false", "optim.warmup_steps=0", *overrides])


def _model(cfg):
    from nlip_ds.model import NLIPModel

    torch.manual_seed(0)
    return NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2, sep_id=3)


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(5, VOCAB, (GLOBAL_BATCH, 12), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # BOS ... EOS
    return {"image": torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), generator=g, dtype=torch.uint8),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "sample_id": torch.arange(GLOBAL_BATCH),
            "noise_type": torch.zeros(GLOBAL_BATCH, dtype=torch.long),
            "concept_ids": torch.randint(5, VOCAB, (GLOBAL_BATCH, 3), generator=g)}


# ------------------------------------------------------------------------------------------------- fast


def test_uint8_images_normalized_in_the_model_equal_the_float32_path():
    from nlip_ds.data.samples import normalize

    cfg = _tiny_cfg("model.mae.enabled=true", "model.vision.mask_ratio=0.5")
    model = _model(cfg).eval()
    batch = _global_batch()
    with torch.no_grad():
        as_uint8 = model(batch, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
        as_float = model({**batch, "image": normalize(batch["image"])}, mask_ratio=0.5,
                         generator=torch.Generator().manual_seed(1))
    for key in ("image_features", "text_features", "caption_logits", "mae_loss"):
        assert torch.equal(as_uint8[key], as_float[key]), key


def test_bf16_model_trains_embeds_and_captions_with_float32_losses():
    from nlip_ds.data.samples import normalize
    from nlip_ds.train.task import NLIPTask

    cfg = _tiny_cfg("model.mae.enabled=true", "model.vision.mask_ratio=0.5", "noise.nitc_mode=penalty")
    model = _model(cfg).to(torch.bfloat16)
    task = NLIPTask(model, cfg)
    batch = _global_batch()
    eps = torch.linspace(0, 0.9, GLOBAL_BATCH)  # float32, as the noise estimator gives it
    terms = task(batch, 0.5 * eps, 1 - eps)
    for key in ("loss", "contrastive_loss", "caption_loss", "mae_loss", "per_sample_loss", "logit_scale"):
        assert terms[key].dtype == torch.float32, key
        assert torch.isfinite(terms[key]).all(), key
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    model.eval()
    for images in (batch["image"], normalize(batch["image"])):  # the loader's uint8, eval's float32
        with torch.no_grad():
            assert model.encode_image(images).dtype == torch.float32  # l2_normalize's float32 rows
            captions = model.generate(images[:2], batch["concept_ids"][:2], strategy="greedy", max_tokens=5,
                                      min_tokens=1)
        assert captions.shape[0] == 2


def test_exported_model_runs_in_bf16_close_to_fp32(tmp_path):
    from nlip_ds.data.samples import normalize
    from nlip_ds.model import NLIPModel

    cfg = _tiny_cfg()
    _model(cfg).save_pretrained(tmp_path / "export")
    fp32 = NLIPModel.from_pretrained(tmp_path / "export")
    bf16 = NLIPModel.from_pretrained(tmp_path / "export").to(torch.bfloat16)
    batch = _global_batch()
    images = normalize(batch["image"])
    with torch.no_grad():
        want, got = fp32.encode_image(images), bf16.encode_image(images).float()
        want_t = fp32.encode_text(batch["input_ids"], batch["attention_mask"])
        got_t = bf16.encode_text(batch["input_ids"], batch["attention_mask"]).float()
    assert (want * got).sum(-1).min() > 0.99 and (want_t * got_t).sum(-1).min() > 0.99  # cosine similarity


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on GPUs")
def test_fp16_is_refused_on_cpu_before_any_work():
    from nlip_ds.train import engine as E

    with pytest.raises(ConfigError, match="train.precision: fp16 needs GPUs.*bf16"):
        E.check_engine_options(_tiny_cfg("train.precision=fp16"))


def test_fp16_loss_scaler_skip_is_counted_apart_from_nonfinite_skips():
    from nlip_ds.noise.estimator import NoiseEstimator
    from nlip_ds.train.nonfinite import NonFiniteGuard, scaler_metrics
    from nlip_ds.train.state import RunState

    class Engine:
        global_steps = 3
        optimizer = type("Opt", (), {"loss_scale": 1024.0})()

        def fp16_enabled(self):
            return True

    cfg = _tiny_cfg("train.precision=fp16")
    state, engine = RunState.create(NoiseEstimator(cfg.noise)), Engine()
    guard = NonFiniteGuard(cfg, "cpu")
    guard.after_optimizer_step(engine, state, skipped=True)  # finite loss everywhere: the scaler's skip
    assert (state.loss_scale_skipped, state.nonfinite_skipped, state.nonfinite_streak) == (1, 0, 0)
    assert scaler_metrics(engine, state) == {"train/loss_scale": 1024.0, "train/loss_scale_skipped": 1}
    guard.loss_for_backward(torch.tensor(float("nan")))
    guard.after_optimizer_step(engine, state, skipped=True)  # a NaN loss: a non-finite skip
    assert (state.loss_scale_skipped, state.nonfinite_skipped) == (1, 1)
    restored = RunState.create(NoiseEstimator(cfg.noise))
    restored.load_shared_state(state.shared_state({}, "sha"))
    assert restored.loss_scale_skipped == 1


# ------------------------------------------------------- slow + dist: world sizes 1 and 2 in bf16, ZeRO-3


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from nlip_ds.train import engine as E
    from nlip_ds.train.task import NLIPTask

    n = GLOBAL_BATCH // world
    # no patch masking: each rank would draw its own masks, not its rows of the global batch's
    cfg = _tiny_cfg(f"train.micro_batch_size={n}", "train.precision=bf16")
    E.init_distributed(cfg)
    model = _model(cfg)
    initial = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()}
    engine = E.initialize(NLIPTask(model, cfg), cfg, E.build_ds_config(cfg, world), total_steps=10)
    batch = {k: v[rank * n:(rank + 1) * n] for k, v in _global_batch().items()}
    eps = torch.linspace(0.0, 0.9, GLOBAL_BATCH)[rank * n:(rank + 1) * n]
    losses = []
    for _ in range(STEPS):
        terms = engine(batch, 0.5 * eps, 1.0 - eps)
        engine.backward(terms["loss"])
        engine.step()
        loss = terms["loss"].detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(loss / world)
    from deepspeed.utils import safe_get_full_fp32_param

    updates = {name: safe_get_full_fp32_param(p) - initial[name] for name, p in engine.module.named_parameters()}
    dtypes = {p.dtype for p in engine.module.parameters()}
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "updates": updates, "dtypes": [str(d) for d in dtypes]}, out)
    from nlip_ds.distributed import leave_process_group

    leave_process_group()  # left to exit-time destructors, gloo's threads can abort the rank (std::terminate)


@pytest.mark.slow
@pytest.mark.dist
def test_bf16_zero3_world_sizes_1_and_2_agree(tmp_path):
    results = {}
    for world in (1, 2):
        path = str(tmp_path / f"ws{world}.pt")
        mp.spawn(_worker, args=(world, free_port(), path), nprocs=world, join=True)
        results[world] = torch.load(path, weights_only=True)
    ref, got = results[1], results[2]
    assert ref["dtypes"] == got["dtypes"] == ["torch.bfloat16"], "the engine should hold bf16 parameters"
    assert ref["losses"][-1] < ref["losses"][0], f"the loss should fall: {ref['losses'].tolist()}"
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=BF16_RTOL, atol=0)
    # The fp32 master weights' total change over the steps: Adam moves a weight whose gradient is near zero by
    # up to lr in either direction, so single elements may differ by that much; the update as a whole may not.
    want = torch.cat([u.flatten() for u in ref["updates"].values()])
    diff = torch.cat([(got["updates"][name] - u).flatten() for name, u in ref["updates"].items()])
    print(f"relative update difference: {diff.norm() / want.norm():.4f}")
    assert diff.norm() / want.norm() < UPDATE_RTOL


# ------------------------------------------------- slow + dist: the real entry point, 2 ranks, bf16, ZeRO-3


def _train(synth_dir: Path, tok: Path, run: Path, *extra: str) -> str:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}", f"data.test={synth_dir / 'test'}",
           f"data.tokenizer={tok}", f"train.output_dir={run}", "train.precision=bf16", "train.micro_batch_size=16",
           "data.workers=0", "monitor.progress=false", "monitor.log_every=1", "train.epochs=2",
           "noise.warmup_epochs=1", "optim.warmup_steps=5", "eval.batch_size=16", *extra]
    return _run(cmd)


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd[:8])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict:
    return {m["step"]: m["train/loss"] for m in _metrics(run) if "train/loss" in m}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(2400)  # three 2-rank runs, an export and an evaluation: about 15 minutes under load 30
def test_bf16_deepspeed_run_refits_resumes_exactly_and_exports(synth_dir, tmp_path):
    tok, full, split = tmp_path / "tokenizer", tmp_path / "full", tmp_path / "split"
    _train(synth_dir, tok, full)
    losses = _losses(full)
    steps = sorted(losses)
    assert len(steps) >= 16
    first, last = sum(losses[s] for s in steps[:3]) / 3, sum(losses[s] for s in steps[-3:]) / 3
    assert last < first - 0.1, f"the loss should fall in bf16: {losses}"
    refits = [m for m in _metrics(full) if "noise/rate" in m]
    assert refits and 0.0 < refits[0]["noise/rate"] < 1.0
    assert "eval/zeroshot_top1" in _metrics(full)[-1]

    _train(synth_dir, tok, split, "train.max_steps=5", "eval.enabled=false")
    out = _train(synth_dir, tok, split, "train.resume=latest")
    assert f"resumed from {split / 'checkpoints'}" in out
    resumed = _losses(split)
    assert resumed.keys() == losses.keys()
    for step in steps:
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), f"step {step}"

    export = tmp_path / "export"
    _run([sys.executable, "-m", "nlip_ds.cli", "export", "--checkpoint", str(full), "--out", str(export)])
    result = tmp_path / "zeroshot.json"
    _run([sys.executable, "-m", "nlip_ds.cli", "eval", "--checkpoint", str(export), "--task", "zeroshot",
          "--data", str(synth_dir / "test"), "--out", str(result), "--no-tensorboard"])
    metrics = json.loads(result.read_text())["metrics"]
    assert metrics["zeroshot_top1"] == pytest.approx(_metrics(full)[-1]["eval/zeroshot_top1"], abs=0.05)
