"""The flat training loop: config -> distributed -> build -> epochs of steps -> evaluation -> summary.

Per step: omega and clean probability looked up by sample id -> engine forward (task: fused loss and
caption loss) -> backward/step -> the per-sample losses to the noise estimator (one all-gather into its bank).
At the start of every epoch after warm-up (or every noise.refit_every samples) the estimator refits its GMM
(nlip_ds/noise/estimator.py owns the schedule). Metrics stay on device between log steps and are reduced
across ranks only there.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter

import torch

from nlip_ds import distributed as D
from nlip_ds.completion.completer import Completer
from nlip_ds.config import Config
from nlip_ds.monitor import MetricSink, ProgressLine, setup_logging
from nlip_ds.noise.estimator import NoiseEstimator
from nlip_ds.run.layout import RunFolder, check_run_folder, step_tag, write_resolved
from nlip_ds.train import engine as E
from nlip_ds.train.build import build_loaders, build_model, build_tokenizer
from nlip_ds.train.checkpoint import resume, save
from nlip_ds.train.nonfinite import NonFiniteGuard, scaler_metrics
from nlip_ds.train.preempt import Preemption
from nlip_ds.train.refit import report_refit
from nlip_ds.train.state import RunState
from nlip_ds.train.task import NLIPTask
from nlip_ds.train.zero import held

logger = logging.getLogger(__name__)

LOGGED_TERMS = ("loss", "contrastive_loss", "caption_loss", "mae_loss", "logit_scale")


def train(cfg: Config) -> dict:
    topo = D.resolve_topology()
    D.export_topology(topo)
    setup_logging(topo.rank)
    check_run_folder(cfg)  # on every rank before init_distributed, which returns once all ranks joined
    E.init_distributed(cfg)
    with D.PeerWatch(topo) as watch:  # a failed collective ends in an error that names the lost rank
        return run_training(cfg, topo, watch)


def run_training(cfg: Config, topo: D.Topology, watch: D.PeerWatch) -> dict:
    logger.info("%d rank(s) via %s; run folder %s", topo.world_size, topo.launcher, cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)
    if topo.is_main:
        write_resolved(cfg, cfg.train.output_dir)
    tokenizer = build_tokenizer(cfg)
    loaders = build_loaders(cfg, tokenizer, topo)
    check_eval_inputs(cfg)
    ds_config = E.build_ds_config(cfg, topo.world_size)
    model = build_model(cfg, tokenizer)
    steps_per_epoch = loaders["train"].num_batches // cfg.train.grad_accum
    noise = NoiseEstimator(cfg.noise, contrastive_batch=cfg.train.micro_batch_size * topo.world_size)
    engine = E.initialize(NLIPTask(model, cfg, noise), cfg, ds_config, steps_per_epoch * cfg.train.epochs)
    completion = Completer(cfg, tokenizer, hold=held, partition=noise.partition) if cfg.completion.enabled else None
    state = RunState.create(noise, completion=completion)
    resume(engine, cfg, state, loaders["train"])
    watch.step = lambda: state.step
    sink = MetricSink(cfg.train.output_dir, enabled=topo.is_main, tensorboard=cfg.monitor.tensorboard)
    try:
        run_epochs(engine, cfg, state, loaders["train"], sink, topo)
        results = evaluate(engine, cfg, sink, state, topo)
    finally:
        sink.close()
    return write_summary(cfg, state, results, topo)


def run_epochs(engine, cfg: Config, state: RunState, loader, sink: MetricSink, topo: D.Topology) -> None:
    total = loader.num_batches * cfg.train.epochs
    batch = cfg.train.micro_batch_size * topo.world_size
    progress = ProgressLine(total, batch, enabled=topo.is_main and cfg.monitor.progress, start_step=state.step)
    acc = MetricAccumulator()
    guard = NonFiniteGuard(cfg, engine.device)
    with Preemption() as preempt:
        while state.epoch < cfg.train.epochs and not reached_max_steps(engine, cfg):
            start_epoch(cfg, state, loader, sink)
            for batch_ in loader:
                train_step(engine, cfg, state, batch_, acc, guard)
                if guard.should_stop(state):  # train.max_nonfinite_steps skipped in a row
                    stop_nonfinite(engine, cfg, state, loader, guard)
                if state.step % cfg.monitor.log_every == 0:
                    log_step(engine, state, acc, sink, progress, loader)
                    if preempt.agreed(engine.device):  # SIGTERM/SIGUSR1 on any rank: checkpoint, exit
                        save(engine, cfg, state, loader)
                        preempt.exit(cfg.train.output_dir, state.step, step_tag(state.step))
                report_refit(cfg, sink, state.noise.refit_if_due(state.epoch, state.step))
                if reached_max_steps(engine, cfg):
                    break
                if cfg.train.save_every and state.step % cfg.train.save_every == 0:
                    save(engine, cfg, state, loader)
            else:
                state.epoch += 1
            save(engine, cfg, state, loader)
    if acc.count:
        log_step(engine, state, acc, sink, progress, loader)
    progress.close()


def start_epoch(cfg: Config, state: RunState, loader, sink: MetricSink) -> None:
    """Select the epoch (a position restored by a resume for this epoch is kept) and refit when due."""
    loader.set_epoch(state.epoch)
    report_refit(cfg, sink, state.noise.start_epoch(state.epoch, state.step))


def reached_max_steps(engine, cfg: Config) -> bool:
    return bool(cfg.train.max_steps) and engine.global_steps >= cfg.train.max_steps


def train_step(engine, cfg: Config, state: RunState, batch: dict, acc: "MetricAccumulator",
               guard: NonFiniteGuard) -> None:
    device = engine.device
    batch = to_device(batch, device)
    ids, flags = batch["sample_id"], noise_flags(batch["noise_type"])
    weights = state.noise.weights(ids, flags)  # (n,) each; epsilon is zero until the first fit
    omega = weights.omega
    if state.completion is not None:  # concept prefix, synthetic captions (lockstep on every rank)
        batch, omega = state.completion.prepare(engine.module.model, state, batch, weights.epsilon, omega)
    terms = engine(batch, omega, weights.clean_prob)
    loss, finite = guard.loss_for_backward(terms["loss"])  # NaN-scaled when not finite: the engine skips the step
    engine.backward(loss)
    optimizer_steps, skipped_steps = engine.global_steps, engine.skipped_steps
    engine.step()
    state.noise.observe(ids, terms["per_sample_loss"], flags=flags)
    state.step += 1
    acc.add({k: terms[k] for k in LOGGED_TERMS if k in terms}, finite)
    if engine.global_steps != optimizer_steps:  # an accumulation boundary: the optimizer stepped or skipped
        guard.after_optimizer_step(engine, state, skipped=engine.skipped_steps != skipped_steps)


def stop_nonfinite(engine, cfg: Config, state: RunState, loader, guard: NonFiniteGuard) -> None:
    """Checkpoint and stop: skipped steps changed neither model nor optimizer, so this is the last good state."""
    message = guard.stop_message(state, str(RunFolder.of(cfg).checkpoint(state.step)))
    state.nonfinite_streak = 0  # a resumed run counts afresh
    save(engine, cfg, state, loader)
    if D.get_rank() == 0:
        logger.error("%s", message)
    D.leave_process_group()
    raise SystemExit(1)


def noise_flags(noise_type: torch.Tensor) -> torch.Tensor:
    """Ground truth for the detection metrics: 1 noisy (incorrect or incomplete), 0 clean, -1 unknown."""
    return torch.where(noise_type < 0, noise_type, (noise_type > 0).long())


class MetricAccumulator:
    """Running sums of scalar tensors, kept on device; reduced across ranks only when read. Steps whose loss was
    not finite (skipped steps) are left out of the means."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.finite: torch.Tensor | float = 0.0  # steps added with a finite loss, on device
        self.count = 0

    def add(self, terms: dict, finite: torch.Tensor) -> None:
        for k, v in terms.items():
            v = torch.where(finite, v.detach().float(), 0.0)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.finite = self.finite + finite.float()
        self.count += 1

    def reduce(self) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys] + [self.finite])
        if D.get_world_size() > 1:
            torch.distributed.all_reduce(stacked)
        means = stacked[:-1] / stacked[-1]  # NaN when no rank had a finite step since the last log
        self.sums, self.finite, self.count = {}, 0.0, 0
        return dict(zip(keys, means.tolist()))


def log_step(engine, state: RunState, acc: MetricAccumulator, sink: MetricSink, progress: ProgressLine,
             loader) -> None:
    metrics = {f"train/{k}": v for k, v in acc.reduce().items()}
    metrics["train/lr"] = engine.get_lr()[0]
    metrics["train/epoch"] = state.epoch
    metrics["train/nonfinite_skipped"] = state.nonfinite_skipped
    metrics.update(scaler_metrics(engine, state))
    metrics["throughput/samples_per_s"] = progress.rate(state.step)
    metrics.update(data_skip_metrics(loader))
    sink.log(metrics, state.step)
    if state.completion is not None:
        state.completion.log(sink, state.step)
    state.final_train = {k: v for k, v in metrics.items() if k.endswith("_loss") or k == "train/loss"}
    progress.update(state.step, state.epoch, metrics.get("train/loss"))


def data_skip_metrics(loader) -> dict:
    """This epoch's skipped samples by reason, summed over ranks (one gather of small dicts, at log steps)."""
    total = Counter()
    for skipped in D.all_gather_object(loader.stats()["skipped"]):
        total.update(skipped)
    return {f"data/skipped/{reason}": n for reason, n in sorted(total.items())}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------ evaluation, summary


def check_eval_inputs(cfg: Config) -> None:
    """Refuse a missing test split, class file or probe data now rather than after training."""
    from nlip_ds.eval import end_of_training

    if end_of_training.enabled(cfg):
        end_of_training.check_inputs(cfg)


def evaluate(engine, cfg: Config, sink: MetricSink, state: RunState, topo: D.Topology) -> dict:
    """Every task of eval.tasks on the checkpoint run_epochs just saved, as `nlip-ds eval` runs them."""
    from nlip_ds.eval import end_of_training
    from nlip_ds.eval.tasks import Runtime

    if not end_of_training.enabled(cfg):
        return {}
    D.barrier()  # every rank's share of the checkpoint is committed before any rank reads it
    results = end_of_training.evaluate_last_checkpoint(cfg, Runtime(engine.device, topo.rank, topo.world_size))
    sink.log({f"eval/{k}": v for k, v in results["metrics"].items()}, state.step)
    return results["metrics"]


def write_summary(cfg: Config, state: RunState, results: dict, topo: D.Topology) -> dict:
    last = state.noise.history[-1] if state.noise.history else {}
    summary = {"steps": state.step, "epochs": state.epoch, "world_size": topo.world_size,
               "final_train": state.final_train, "noise": last, "eval": results}
    if topo.is_main:
        RunFolder.of(cfg).summary.write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, cfg)
    return summary


def print_summary(summary: dict, cfg: Config) -> None:
    lines = ["", "=== nlip-ds run summary ===", f"run folder      {cfg.train.output_dir}",
             f"steps / epochs  {summary['steps']} / {summary['epochs']} on {summary['world_size']} rank(s)"]
    for k, v in summary["final_train"].items():
        lines.append(f"{k:<15} {v:.4f}")
    noise = summary["noise"]
    if noise:
        lines.append(f"noise rate      estimated {noise.get('noise/rate', float('nan')):.3f}"
                     f" | true {noise.get('noise/true_rate', float('nan')):.3f}")
        if "noise/auc" in noise:
            lines.append(f"detection       AUC {noise['noise/auc']:.3f}  precision "
                         f"{noise['noise/precision']:.3f}  recall {noise['noise/recall']:.3f}")
    for k, v in summary["eval"].items():
        lines.append(f"eval {k:<10} {v:.4f}")
    lines.append(f"TensorBoard     tensorboard --logdir {RunFolder.of(cfg).tensorboard}")
    print("\n".join(lines), flush=True)
