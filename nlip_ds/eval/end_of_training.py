"""The evaluation at the end of training: the run's last checkpoint, evaluated as `nlip-ds eval` evaluates it.

Every rank consolidates the checkpoint just written into a plain NLIPModel (eval/checkpoint.py) and runs the
one evaluator (eval/tasks.py) with EvalOptions.from_config: the same model, the same inputs and the same code
as `nlip-ds eval --checkpoint RUN`, hence the same numbers. On the plain model no rank waits on another, so
every task, caption generation included, runs on any number of ranks without lockstep. `check_inputs` runs
before training, so that a missing test split or class file is refused before any work.
"""
from __future__ import annotations

import logging
from pathlib import Path

from nlip_ds.config import Config, ConfigError
from nlip_ds.eval.data import open_records
from nlip_ds.eval.tasks import TASKS, EvalOptions, Runtime, check_options, evaluate, resolve_class_names

logger = logging.getLogger(__name__)

RESULTS_NAME = "end_of_training"  # RUN/eval/end_of_training.json


def enabled(cfg: Config) -> bool:
    return cfg.eval.enabled and bool(cfg.data.test)


def check_inputs(cfg: Config) -> None:
    """Open what the configured tasks will read (the first record of data.test and of the probe's data, the
    class names, the templates); a problem is a ConfigError naming the key."""
    opts = EvalOptions.from_config(cfg)
    bad = [t for t in opts.templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"eval.templates: every template needs exactly one {{}}, not {bad[0]!r}")
    try:
        check_options(opts)
        next(iter(open_records(opts.data, split=opts.split)), None)
        if any(TASKS[t].class_names for t in opts.tasks):
            resolve_class_names(opts)
        if "linear_probe" in opts.tasks:
            next(iter(open_records(opts.probe_data, split=opts.split)), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval (data.test={cfg.data.test}): {exc}") from None


def evaluate_last_checkpoint(cfg: Config, rt: Runtime) -> dict:
    """Results of eval.tasks on data.test for the run's latest checkpoint (the same dict on every rank); rank 0
    writes them to RUN/eval/end_of_training.json and prints the table."""
    from nlip_ds.eval.checkpoint import load_for_eval
    from nlip_ds.eval.report import format_table, write_results

    loaded = load_for_eval(Path(cfg.train.output_dir), None, rt.device)
    logger.info("evaluating checkpoint step %d on %s: %s", loaded.step, cfg.data.test, ", ".join(cfg.eval.tasks))
    results = evaluate(loaded.model, loaded.tokenizer, EvalOptions.from_config(cfg), rt)
    results.update(checkpoint=str(cfg.train.output_dir), step=loaded.step, world_size=rt.world_size)
    if rt.rank == 0:
        write_results(results, loaded.default_output(RESULTS_NAME))
        print(format_table(results), flush=True)
    return results
