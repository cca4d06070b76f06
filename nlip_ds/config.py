"""One typed config tree for a run: nested dataclasses, loaded from YAML, with `section.key=value` overrides.

Every field carries its documentation and its allowed range in `metadata`; `validate()` checks them all and
names the full dotted key, the bad value and what is allowed. Nothing else in nlip-ds parses config files.
"""
from __future__ import annotations

import dataclasses
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from nlip_ds.choices import EVAL_STRATEGIES, EVAL_TASKS, GMM_EPSILONS, GMM_INITS, PRECISIONS, STRATEGIES
from nlip_ds.noise.forms import NITC_FORMS


class ConfigError(ValueError):
    """A config file or override that is refused before any work starts."""


def opt(default, doc: str, *, choices=None, lo=None, hi=None, factory=False, shape=False, legacy=None):
    """A config field: its default, one line of documentation and its allowed values or range. `shape=True`
    marks a field that fixes the architecture (a parameter's shape, or how weights are split, as heads): a
    checkpoint saved with another value cannot be resumed. `legacy`: the value that runs written before the
    field existed had (filled in when their resolved config is read)."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "shape": shape, "legacy": legacy}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class VisionConfig:
    name: str = opt("vit_custom", "timm model name (e.g. vit_base_patch32_224), or vit_custom to build a "
                    "timm VisionTransformer from the fields below", shape=True)
    image_size: int = opt(32, "input resolution in pixels", lo=8, hi=1024, shape=True)
    patch_size: int = opt(8, "patch size in pixels (image_size must be a multiple)", lo=1, hi=64, shape=True)
    width: int = opt(64, "transformer width", lo=8, shape=True)
    depth: int = opt(2, "number of transformer blocks", lo=1, shape=True)
    heads: int = opt(2, "attention heads (must divide width)", lo=1, shape=True)
    mlp_ratio: float = opt(4.0, "MLP hidden size over width", lo=0.5, hi=16.0, shape=True)
    mask_ratio: float = opt(0.0, "fraction of patches dropped before the blocks in training (0 disables)",
                            lo=0.0, hi=0.95)
    pretrained_path: Optional[str] = opt(None, "local timm weights (.safetensors or .pth, loaded weights-only)")
    pos_embed_std: Optional[float] = opt(None, "standard deviation of the position embedding at init (unset: the "
                                         "layout's, width^-0.5 for clip); larger makes where a patch lies as "
                                         "visible as what it shows from the first step (docs/model.md)", lo=0.0)
    layout: str = opt("clip", "clip: CLIP's ViT (LayerNorm before the blocks, no patch-embedding bias, QuickGELU), "
                      "exportable to transformers and open_clip (docs/export.md); timm: the timm model's own "
                      "layout (for vit_custom: GELU, patch bias, no pre-norm), as runs before this option",
                      choices=("clip", "timm"), legacy="timm", shape=True)


@dataclass
class TextConfig:
    width: int = opt(64, "transformer width", lo=8, shape=True)
    depth: int = opt(2, "number of transformer layers", lo=1, shape=True)
    heads: int = opt(2, "attention heads (must divide width)", lo=1, shape=True)
    context_length: int = opt(32, "maximum tokens of `[concepts] <sep> caption`", lo=4, hi=1024, shape=True)
    concept_dropout: float = opt(0.5, "probability of dropping the whole concept prefix in training",
                                 lo=0.0, hi=1.0)
    prefix_in_embedding: bool = opt(False, "let the contrastive text embedding read the concept prefix too "
                                    "(the paper's T_e over [concepts] <sep> caption, docs/method.md); off: the prefix "
                                    "reaches only the caption decoder's memory, since the image-derived prefix lets a "
                                    "text match its image without reading the caption (docs/results.md)")
    concept_grad: bool = opt(True, "with the prefix outside the embedding, let the caption loss train T_e through "
                             "the concept features it hands the decoder; off: those features carry no gradient "
                             "(tried against unstable zero-shot, not better: docs/completion.md)")


@dataclass
class DecoderConfig:
    width: int = opt(64, "transformer width", lo=8, shape=True)
    depth: int = opt(2, "number of decoder layers", lo=1, shape=True)
    heads: int = opt(2, "attention heads (must divide width)", lo=1, shape=True)
    max_length: int = opt(32, "maximum caption tokens", lo=4, hi=1024, shape=True)
    label_smoothing: float = opt(0.1, "label smoothing of the caption cross-entropy", lo=0.0, hi=0.5)
    dropout: float = opt(0.1, "dropout in the decoder's attention and MLP (BERT/BLIP default)", lo=0.0, hi=0.9)
    loss_weight: float = opt(1.0, "alpha: weight of the caption loss L_LM in the total", lo=0.0)


@dataclass
class MAEConfig:
    enabled: bool = opt(False, "train the MAE decoder V_d (needs model.vision.mask_ratio > 0)", shape=True)
    width: int = opt(64, "decoder width", lo=8, shape=True)
    depth: int = opt(1, "decoder blocks", lo=1, shape=True)
    heads: int = opt(2, "attention heads (must divide width)", lo=1, shape=True)
    loss_weight: float = opt(1.0, "beta: weight of the reconstruction loss L_IR in the total", lo=0.0)


@dataclass
class ModelConfig:
    vision: VisionConfig = opt(VisionConfig, "image encoder V_e", factory=True)
    text: TextConfig = opt(TextConfig, "text encoder T_e", factory=True)
    decoder: DecoderConfig = opt(DecoderConfig, "concept-conditioned caption decoder C_d", factory=True)
    mae: MAEConfig = opt(MAEConfig, "masked-patch decoder V_d", factory=True)
    embed_dim: int = opt(64, "shared embedding size of the projections", lo=8, shape=True)
    logit_scale_init: float = opt(1 / 0.07, "initial logit scale 1/tau", lo=1.0, hi=100.0)
    logit_scale_max: float = opt(100.0, "clamp of the logit scale", lo=1.0)


@dataclass
class DataConfig:
    train: Optional[str] = opt(None, "training shards (brace pattern; several sources as 'a::b' are "
                               "concatenated, weights in data.train_weights)")
    train_weights: Optional[list] = opt(None, "sampling weight per '::' source (resampled mode only)")
    val: Optional[str] = opt(None, "validation shards")
    test: Optional[str] = opt(None, "test shards (clean, for evaluation)")
    tokenizer: Optional[str] = opt(None, "tokenizer folder; trained on the training captions when missing")
    vocab_size: int = opt(1024, "vocabulary size when a tokenizer is trained", lo=64, hi=1_000_000)
    resampled: bool = opt(False, "sample shards with replacement (huge datasets) instead of exact epochs")
    samples_per_epoch: Optional[int] = opt(None, "epoch length in samples in resampled mode", lo=1)
    workers: int = opt(1, "loader worker processes per rank", lo=0, hi=64)
    shuffle_buffer: int = opt(1000, "samples in the in-memory shuffle buffer", lo=0)
    crop_scale_min: float = opt(0.5, "RandomResizedCrop lower scale bound in training", lo=0.05, hi=1.0)
    max_image_pixels: int = opt(50_000_000, "images with more pixels are skipped (decompression bombs)",
                                lo=1024)
    max_skip_rate: float = opt(0.2, "stop the run when more than this share of samples is skipped",
                               lo=0.0, hi=1.0)


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer", choices=("adamw", "lamb"))
    lr: float = opt(1e-3, "peak learning rate", lo=0.0, hi=10.0)
    weight_decay: float = opt(0.03, "weight decay (none on biases, norms, embeddings, logit scale)", lo=0.0)
    betas: list = opt(lambda: [0.9, 0.999], "Adam/LAMB betas", factory=True)
    eps: float = opt(1e-8, "Adam/LAMB epsilon", lo=0.0)
    warmup_steps: int = opt(10, "linear warm-up steps", lo=0)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    min_lr_ratio: float = opt(0.0, "final learning rate over peak (cosine)", lo=0.0, hi=1.0)
    grad_clip: float = opt(1.0, "gradient norm clip (0 disables)", lo=0.0)


@dataclass
class TrainConfig:
    epochs: int = opt(4, "training epochs", lo=1)
    micro_batch_size: int = opt(32, "samples per rank per forward pass", lo=1)
    grad_accum: int = opt(1, "gradient accumulation steps", lo=1)
    output_dir: str = opt("runs/tiny-cpu", "run folder: checkpoints, TensorBoard events, metrics.jsonl")
    resume: Optional[str] = opt(None, "'latest' or a checkpoint folder to continue from")
    seed: int = opt(0, "seed of model init, data order and augmentation", lo=0)
    precision: str = opt("fp32", "compute precision (merged into the DeepSpeed config)",
                         choices=PRECISIONS)
    save_every: int = opt(0, "checkpoint every N steps besides the end of each epoch (0: epoch ends only)",
                          lo=0)
    keep_last: int = opt(2, "checkpoints kept", lo=1)
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (debugging)", lo=1)
    max_nonfinite_steps: int = opt(5, "consecutive skipped non-finite steps before the run stops", lo=1)
    collective_timeout_s: int = opt(600, "timeout of collectives, after which a lost rank is reported", lo=10)


@dataclass
class NoiseConfig:
    enabled: bool = opt(True, "estimate per-sample noise and use the noise-adaptive loss")
    warmup_epochs: int = opt(1, "E_w: epochs of plain CLIP loss before the first fit", lo=0)
    lambda_: float = opt(1.0, "omega = lambda * epsilon", lo=0.0, hi=1.0)
    nitc_mode: str = opt("reweight", "form of L_NITC (docs/method.md): reweight trains each pair with weight "
                         "1 - omega; soft_target (the paper-like form) also pulls likely-noisy pairs towards "
                         "uniform similarity, which cost accuracy at 50% noise (docs/results.md)",
                         choices=tuple(NITC_FORMS))
    penalty_mu: float = opt(1.0, "mu of the penalty form", lo=0.0)
    refit_every: Optional[int] = opt(None, "refit every N samples (streaming data) instead of per epoch",
                                     lo=1)
    trust_ratio: float = opt(0.8, "a refit sets epsilon only when its clean component's mean loss is below this "
                             "fraction of the chance loss ln(global batch); until then the loss stays CLIP's, "
                             "since a fit of a model that has not learned yet discards pairs at random "
                             "(docs/noise.md); 1 or more turns the test off in practice", lo=0.0)
    max_rate: float = opt(0.9, "a refit that calls more than this fraction of the pairs noisy is not used (its clean "
                          "component is the low tail of a model at chance; docs/noise.md)", lo=0.0, hi=1.0)
    reg_covar: float = opt(5e-4, "variance floor of the mixture", lo=0.0)
    tol: float = opt(1e-4, "EM stopping tolerance on the mean log-likelihood (1e-2, the method's, stops EM after "
                            "2 iterations on real loss shapes: docs/noise.md)", lo=0.0)
    max_iter: int = opt(100, "EM iterations at most", lo=1)
    em_init: str = opt("midrange", "EM's first split of the losses: midrange (the middle of their robust range) or "
                       "median (a long tail of high losses then cannot leave the noisy component only the tail; "
                       "docs/noise.md, \"Rank assignment\")", choices=GMM_INITS)
    epsilon: str = opt("posterior", "how a fit sets epsilon: posterior (the mixture's posterior of the noisy "
                       "component) or rank (1 for the pairs with the mixture's noise rate x N highest losses, 0 for "
                       "the rest; docs/noise.md, \"Rank assignment\")", choices=GMM_EPSILONS)
    oracle: bool = opt(False, "benchmarks only: epsilon is the data's own noise label (1 for a pair whose shard "
                       "metadata says incorrect or incomplete, 0 for clean) from epoch warmup_epochs on, instead "
                       "of the mixture's: the accuracy perfect detection would give (docs/noise.md, \"Oracle\"); "
                       "training stops at the first sample without a label")
    state: str = opt("replicated", "where the per-sample noise state lives: replicated (every rank holds every "
                     "sample's loss and epsilon) or sharded (each rank its 1/world slice, id mod world size; "
                     "docs/noise.md)", choices=("replicated", "sharded"))


@dataclass
class CompletionConfig:
    enabled: bool = opt(False, "generate synthetic captions for noisy pairs (noise-completion)")
    start_epoch: int = opt(2, "E_c: first epoch that uses synthetic captions", lo=0)
    policy: str = opt("replace", "how a synthetic caption is used", choices=("replace", "concat", "threshold"))
    vocabulary: Optional[str] = opt(None, "concept vocabulary file (one name per line); the shipped default "
                                    "when unset")
    top_k: int = opt(5, "concepts retrieved per image", lo=1, hi=64)
    refresh_concepts_every: int = opt(50, "steps between concept-embedding refreshes", lo=1)
    per_step_budget: int = opt(8, "synthetic captions generated per rank per step at most", lo=0)
    refresh_every_epochs: int = opt(2, "R: regenerate cached captions after this many epochs", lo=1)
    strategy: str = opt("nucleus", "decoding of synthetic captions (nucleus: the method's sampling; greedy or "
                        "beam: the decoder's most likely caption)", choices=tuple(STRATEGIES))
    top_p: float = opt(0.9, "nucleus sampling mass", lo=0.0, hi=1.0)
    num_beams: int = opt(3, "beams of the beam strategy", lo=1, hi=16)
    min_tokens: int = opt(5, "shortest synthetic caption", lo=1)
    max_tokens: int = opt(30, "longest synthetic caption", lo=1)
    filter: bool = opt(True, "train on a synthetic caption only if the model's own embeddings put it closer to "
                       "its image than the original caption (BLIP's CapFilt); otherwise the pair keeps its "
                       "original caption")
    filter_to_clean: bool = opt(True, "with the filter, also require the synthetic caption to lie at least as "
                                "close to its image as the median pair of the batch the estimator calls clean")
    candidates: int = opt(1, "sampled captions per pair; the one the model's embeddings put closest to the image "
                          "is kept (needs strategy nucleus when above 1; 0: no decoding, concept captions only)",
                          lo=0, hi=64)
    concept_captions: int = opt(0, "the pair's top retrieved concepts, each written in the concept template ('a "
                                "photo of a {}.'), that join the sampled captions as candidates (at most top_k)",
                                lo=0, hi=64)
    distinct: bool = opt(True, "at most one pair of the global batch trains on each synthetic caption text: the "
                         "other pairs whose kept caption is the same keep their original caption (identical texts "
                         "would be each other's negatives in the contrastive loss)")


@dataclass
class EvalConfig:
    enabled: bool = opt(True, "evaluate on data.test at the end of training")
    tasks: list = opt(lambda: ["zeroshot", "retrieval"], f"evaluation tasks, any of {', '.join(EVAL_TASKS)}",
                      factory=True)
    templates: list = opt(lambda: ["a photo of a {}.", "a picture of a {}.", "an image of a {}."],
                          "zero-shot prompt templates", factory=True)
    classes: Optional[str] = opt(None, "class-name file for zero-shot (default: classes.txt at the root of "
                                 "the data.test dataset)")
    batch_size: int = opt(64, "evaluation batch size per rank", lo=1)
    max_samples: Optional[int] = opt(None, "evaluate on at most this many samples", lo=1)
    probe_data: Optional[str] = opt(None, "labelled images the linear_probe task trains on (default: data.val)")
    probe_c: float = opt(1.0, "inverse regularization strength of the linear probe", lo=0.0)
    strategy: str = opt("greedy", "caption task decoding", choices=EVAL_STRATEGIES)
    max_tokens: int = opt(20, "longest caption of the caption task, in tokens", lo=1)
    min_tokens: int = opt(1, "shortest caption of the caption task, in tokens", lo=0)
    num_beams: int = opt(3, "beams of the beam strategy in the caption task", lo=1, hi=16)


@dataclass
class MonitorConfig:
    tensorboard: bool = opt(True, "write TensorBoard events into the run folder")
    log_every: int = opt(10, "steps between metric logs (cross-rank reductions happen only then)", lo=1)
    progress: bool = opt(True, "progress bar on rank 0")
    histogram_every_refit: bool = opt(True, "loss histograms and mixture plot at each GMM refit")
    save_refit_data: bool = opt(False, "also write each refit's losses, ground truth, epsilon and mixture to "
                                "RUN/noise/refit_*.pt (for offline plots; 17 bytes per sample)")


@dataclass
class DeepSpeedConfig:
    config: str = opt("ds_configs/zero3.json", "DeepSpeed JSON with engine settings only (ZeRO, offload)")


@dataclass
class Config:
    model: ModelConfig = opt(ModelConfig, "the four modules and the projections", factory=True)
    data: DataConfig = opt(DataConfig, "shards, tokenizer and loader", factory=True)
    optim: OptimConfig = opt(OptimConfig, "optimizer and schedule", factory=True)
    train: TrainConfig = opt(TrainConfig, "loop, batch, checkpoints", factory=True)
    noise: NoiseConfig = opt(NoiseConfig, "noise estimator and noise-harmonization", factory=True)
    completion: CompletionConfig = opt(CompletionConfig, "noise-completion", factory=True)
    eval: EvalConfig = opt(EvalConfig, "evaluation", factory=True)
    monitor: MonitorConfig = opt(MonitorConfig, "TensorBoard and progress", factory=True)
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig, "DeepSpeed engine settings", factory=True)


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 5e-3 as a string: it wants 5.0e-3. Accept what any user would write.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys of "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) else _coerce(key, value, tp)
    return cls(**kwargs)


def _check_range(key: str, value, meta) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if value is None:
        return
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")


def _check_tree(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_tree(value, prefix + f.name + ".")
        else:
            _check_range(prefix + f.name, value, f.metadata)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that a single range cannot express."""
    v = cfg.model.vision
    if v.name == "vit_custom" and v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size: {v.image_size} is not a multiple of "
                          f"model.vision.patch_size={v.patch_size}")
    for section in ("vision", "text", "decoder", "mae"):
        sub = getattr(cfg.model, section)
        if sub.width % sub.heads:
            raise ConfigError(f"model.{section}.heads: {sub.heads} does not divide model.{section}.width="
                              f"{sub.width}")
    if cfg.model.mae.enabled and cfg.model.vision.mask_ratio <= 0:
        raise ConfigError("model.mae.enabled: the MAE decoder needs model.vision.mask_ratio > 0")
    if cfg.noise.oracle and not cfg.noise.enabled:
        raise ConfigError("noise.oracle: the oracle sets epsilon, which only a run with noise.enabled=true uses")
    c = cfg.completion
    if c.min_tokens > c.max_tokens:
        raise ConfigError(f"completion.min_tokens: {c.min_tokens} exceeds completion.max_tokens={c.max_tokens}")
    if c.enabled and not cfg.noise.enabled:
        raise ConfigError("completion.enabled: noise-completion picks pairs by their noise probability and "
                          "needs noise.enabled=true")
    if c.candidates > 1 and c.strategy != "nucleus":
        raise ConfigError(f"completion.candidates: {c.candidates} candidates of the {c.strategy} strategy would be "
                          "one caption repeated; use completion.strategy=nucleus or completion.candidates=1")
    if c.candidates + c.concept_captions < 1:
        raise ConfigError("completion.candidates: 0 sampled captions and completion.concept_captions=0 leave no "
                          "candidate caption; set either above 0")
    if c.concept_captions > c.top_k:
        raise ConfigError(f"completion.concept_captions: {c.concept_captions} exceeds completion.top_k={c.top_k}, "
                          "the concepts retrieved per image")
    if c.enabled and c.max_tokens > cfg.model.decoder.max_length:
        raise ConfigError(f"completion.max_tokens: {c.max_tokens} exceeds model.decoder.max_length="
                          f"{cfg.model.decoder.max_length}")
    if cfg.data.resampled and cfg.data.samples_per_epoch is None:
        raise ConfigError("data.samples_per_epoch: required when data.resampled=true")
    _check_eval(cfg)


def _check_eval(cfg: Config) -> None:
    """Every listed task must be able to run at the end of training (docs/eval.md)."""
    e = cfg.eval
    unknown_tasks = set(e.tasks) - set(EVAL_TASKS)
    if unknown_tasks:
        raise ConfigError(f"eval.tasks: unknown task {sorted(unknown_tasks)[0]!r}; allowed: "
                          f"{', '.join(EVAL_TASKS)}")
    if "linear_probe" in e.tasks and not (e.probe_data or cfg.data.val):
        raise ConfigError("eval.tasks: linear_probe needs labelled training images: set eval.probe_data (or "
                          "data.val)")
    if "caption" in e.tasks and e.max_tokens > cfg.model.decoder.max_length:
        raise ConfigError(f"eval.max_tokens: {e.max_tokens} exceeds model.decoder.max_length="
                          f"{cfg.model.decoder.max_length}")
    if e.min_tokens > e.max_tokens:
        raise ConfigError(f"eval.min_tokens: {e.min_tokens} exceeds eval.max_tokens={e.max_tokens}")


def validate(cfg: Config) -> Config:
    _check_tree(cfg)
    _check_consistency(cfg)
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return key.strip().split("."), value


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML file (or the defaults), apply `section.key=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    for item in overrides:
        _apply_override(tree, *_parse_override(item))
    return validate(_build(Config, tree, ""))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def fill_legacy(data: dict, cls=None) -> dict:
    """A resolved config (run folder, checkpoint manifest, export) that lacks a field predates it: give it the
    field's legacy value, so old runs load with the architecture they were trained with."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out.get(f.name), dict):
            out[f.name] = fill_legacy(out[f.name], hints[f.name])
        elif f.name not in out and f.metadata.get("legacy") is not None:
            out[f.name] = f.metadata["legacy"]
    return out


def from_dict(data: dict) -> Config:
    """A resolved config (as written by write_resolved or an export); fields it lacks get their legacy value."""
    return validate(_build(Config, fill_legacy(data), ""))


def git_sha(repo: Optional[Path] = None) -> str:
    """The commit the code runs from, with '-dirty' when the tree has changes; 'unknown' outside git."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: the source of `nlip-ds config --help-keys`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, repr(default), f.metadata.get("doc", "")))
    return rows


def shape_keys(cls=Config, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the fields declared with opt(..., shape=True): the resume check refuses a change there."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= shape_keys(hints[f.name], prefix + f.name + ".")
        elif f.metadata.get("shape"):
            keys.add(prefix + f.name)
    return frozenset(keys)
