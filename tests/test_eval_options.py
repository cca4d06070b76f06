"""The one evaluator: task and strategy names defined once, EvalOptions from a config or from `nlip-ds eval`'s
arguments, every configured task runnable (or refused before any work), all four tasks in one evaluate()."""
import argparse
import dataclasses

import pytest

from nlip_ds.choices import EVAL_STRATEGIES, EVAL_TASKS, STRATEGIES
from nlip_ds.config import ConfigError, load_config


def test_names_are_defined_once_and_used_everywhere():
    from nlip_ds.cli import build_parser
    from nlip_ds.config import CompletionConfig, EvalConfig
    from nlip_ds.eval.tasks import TASKS

    assert tuple(TASKS) == tuple(EVAL_TASKS)
    meta = {f.name: f.metadata for f in dataclasses.fields(EvalConfig)}
    assert meta["strategy"]["choices"] == EVAL_STRATEGIES
    completion = {f.name: f.metadata for f in dataclasses.fields(CompletionConfig)}
    assert completion["strategy"]["choices"] == tuple(STRATEGIES)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = {name: {a.dest: a.choices for a in p._actions} for name, p in sub.choices.items()}
    assert choices["eval"]["task"] == tuple(EVAL_TASKS)
    assert choices["eval"]["strategy"] == EVAL_STRATEGIES
    assert choices["caption"]["strategy"] == tuple(STRATEGIES)


@pytest.mark.parametrize("overrides, message", [
    (["eval.tasks=[linear_probe]", "data.val=null"], "eval.tasks: linear_probe needs labelled training images"),
    (["eval.tasks=[caption]", "eval.max_tokens=40", "model.decoder.max_length=32"], "eval.max_tokens: 40 exceeds"),
    (["eval.min_tokens=9", "eval.max_tokens=8"], "eval.min_tokens: 9 exceeds eval.max_tokens=8"),
    (["eval.strategy=nucleus"], "eval.strategy"),
])
def test_config_refuses_tasks_that_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_options_from_config_and_from_the_command_line_agree(synth_dir):
    from nlip_ds.cli import build_parser
    from nlip_ds.eval.cli import options_from_args
    from nlip_ds.eval.tasks import EvalOptions

    test, val = str(synth_dir / "test"), str(synth_dir / "val")
    cfg = load_config(None, [f"data.test={test}", f"data.val={val}", "eval.tasks=[caption,linear_probe]",
                             "eval.strategy=beam", "eval.max_tokens=12", "eval.batch_size=8"])
    from_cfg = EvalOptions.from_config(cfg)
    args = build_parser().parse_args(["eval", "--checkpoint", "x", "--task", "caption", "--data", test,
                                      "--linear-probe", "--train-data", val, "--strategy", "beam",
                                      "--max-tokens", "12", "--batch-size", "8"])
    from_cli = options_from_args(args)
    assert from_cli.tasks == from_cfg.tasks == ("caption", "linear_probe")
    assert from_cli.generation == from_cfg.generation
    assert (from_cli.generation.strategy, from_cli.generation.max_tokens, from_cli.generation.min_tokens) == \
        ("beam", 12, 1)
    assert (from_cli.probe_data, from_cli.batch_size) == (from_cfg.probe_data, from_cfg.batch_size) == (val, 8)


def test_end_of_training_refuses_missing_inputs_before_training(synth_dir, tmp_path):
    from nlip_ds.eval.end_of_training import check_inputs

    check_inputs(load_config(None, [f"data.test={synth_dir / 'test'}"]))  # classes.txt at the dataset root
    with pytest.raises(ConfigError, match="nowhere"):
        check_inputs(load_config(None, [f"data.test={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="eval.templates"):
        check_inputs(load_config(None, [f"data.test={synth_dir / 'test'}", "eval.templates=[a photo]"]))
    with pytest.raises(ConfigError, match="class-name"):
        check_inputs(load_config(None, [f"data.test={synth_dir / 'test'}", f"eval.classes={tmp_path / 'c.txt'}"]))


@pytest.mark.slow
def test_every_task_runs_in_one_evaluation(random_export, synth_dir):
    from nlip_ds.eval.checkpoint import load_for_eval
    from nlip_ds.eval.tasks import EvalOptions, evaluate

    loaded = load_for_eval(random_export)
    from nlip_ds.model.generation import GenerationOptions

    opts = EvalOptions(tuple(EVAL_TASKS), str(synth_dir / "test"), batch_size=16, max_samples=12,
                       probe_data=str(synth_dir / "val"), generation=GenerationOptions("greedy", max_tokens=6))
    results = evaluate(loaded.model, loaded.tokenizer, opts)
    assert results["tasks"] == list(EVAL_TASKS) and results["num_images"] == 12
    assert {"zeroshot_top1", "i2t_r1", "t2i_r1", "bleu4", "cider", "linear_probe_top1"} <= results["metrics"].keys()
    assert len(results["captions"]) == 12 and results["num_captions"] >= 12
