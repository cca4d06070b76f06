"""Crash-safe checkpoints: atomic saves, validation on load, and exact resume after kill -9.

- fast: the commit protocol interrupted before every rename/replace/removal (in process, a fake engine),
  damaged checkpoints refused with the file named, config and shape compatibility;
- slow: real single-rank saving processes (DeepSpeed ZeRO-3 engine) killed with SIGKILL in the middle of a
  shard write, before the commit, the `latest` update, pruning, and the swap of a step saved twice; after
  each kill `latest` names a complete checkpoint that the next process loads with the same weights, and the
  checkpoint before it is intact;
- slow + dist: a 2-rank `deepspeed` run killed with SIGKILL mid-epoch and resumed with train.resume=latest
  gives the losses and final weights of the uninterrupted run.
"""
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nlip_ds.config import load_config, to_dict
from nlip_ds.distributed import free_port
from nlip_ds.run import checkpoint as C
from nlip_ds.run.layout import STEP_TAG
from nlip_ds.train import checkpoint as T
from nlip_ds.train import engine as E

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fast: a fake engine


class FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: it writes ZeRO-3-named shards of one rank."""

    def __init__(self, weight: float = 1.0, out_features: int = 3):
        self.module = torch.nn.Linear(2, out_features)
        self.weight = weight

    def zero_optimization_stage(self) -> int:
        return 3

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest, "DeepSpeed must not write `latest` itself (it does so non-atomically)"
        folder = Path(root) / tag
        folder.mkdir(parents=True)
        torch.save({"w": torch.full((4,), self.weight), **client_state},
                   folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        torch.save({"m": torch.zeros(4)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def _cfg(run: Path, *overrides: str):
    return load_config("configs/tiny-cpu.yaml", [f"train.output_dir={run}", *overrides])


def _save(cfg, tag: str, weight: float) -> Path:
    shared = {"step": int(tag[4:]), "epoch": 0, "config": to_dict(cfg), "git_sha": "test"}
    return T.save_checkpoint(FakeEngine(weight), cfg, tag, shared, {"weight": weight})


def _latest_weight(root: Path) -> float:
    """The weight of the checkpoint `latest` names, after checking every file of it."""
    name = C.read_latest(root)
    C.verify_checkpoint(root / name)
    return torch.load(root / name / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)["w"][0].item()


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the save may catch it."""


@pytest.mark.parametrize("same_tag", [False, True], ids=["new_tag", "same_tag"])
def test_save_interrupted_before_any_rename_or_removal_keeps_latest_complete(tmp_path, monkeypatch, same_tag):
    """Stop a save before its n-th rename/replace/rmtree, for every n, and check what a kill would leave."""
    real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree}
    n = 0
    while True:
        n += 1
        run = tmp_path / f"n{n}"
        cfg = _cfg(run, "train.keep_last=1")
        _save(cfg, "step1", weight=1.0)
        calls = []

        def hooked(kind):
            def op(*args, **kwargs):
                calls.append(kind)
                if len(calls) == n:
                    raise Killed
                return real[kind](*args, **kwargs)
            return op

        for kind in real:
            monkeypatch.setattr(os if kind != "rmtree" else shutil, kind, hooked(kind))
        try:
            _save(cfg, "step1" if same_tag else "step2", weight=2.0)
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.undo()
        root = C.checkpoint_dir(cfg)
        assert _latest_weight(root) in (1.0, 2.0), f"interrupted before operation {n} ({calls[-1]})"
        if not finished:
            continue
        assert _latest_weight(root) == 2.0
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [C.read_latest(root)] == [
            "step1" if same_tag else "step2"], "leftovers of the save or of the previous checkpoint"
        break
    assert n >= 5, f"the save made only {n - 1} renames/removals: the test hooks the wrong functions"


def test_interrupted_saves_leave_nothing_behind_after_the_next_save(tmp_path):
    cfg = _cfg(tmp_path / "run", "train.keep_last=2")
    _save(cfg, "step1", 1.0)
    root = C.checkpoint_dir(cfg)
    (root / "step2.0badc0de.partial").mkdir()  # a save killed while writing
    (root / "step1.deadbeef.old").mkdir()  # a removal killed half way
    _save(cfg, "step2", 2.0)
    _save(cfg, "step3", 3.0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step2", "step3"]
    assert C.read_latest(root) == "step3"


def test_damaged_checkpoint_is_refused_naming_the_file_and_an_earlier_one(tmp_path):
    cfg = _cfg(tmp_path / "run", "train.keep_last=3")
    _save(cfg, "step1", 1.0)
    folder = _save(cfg, "step2", 2.0)
    shard = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(C.CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt has 10 bytes") as err:
        C.verify_checkpoint(folder)
    assert f"train.resume={folder.parent / 'step1'}" in str(err.value)
    shard.unlink()
    with pytest.raises(C.CheckpointError, match="optim_states.pt is missing"):
        C.verify_checkpoint(folder)
    (folder / C.MANIFEST).unlink()
    with pytest.raises(C.CheckpointError, match="has no manifest.json: its save did not finish"):
        C.verify_checkpoint(folder)


def test_save_refuses_to_commit_when_a_rank_file_is_missing(tmp_path):
    class LosesOptimizerShard(FakeEngine):
        def save_checkpoint(self, root, tag, client_state, save_latest):
            super().save_checkpoint(root, tag, client_state, save_latest)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()

    cfg = _cfg(tmp_path / "run")
    _save(cfg, "step1", 1.0)
    with pytest.raises(C.CheckpointError, match=r"step2 was not committed: .* lacks \*zero_pp_rank_0_\*optim"):
        T.save_checkpoint(LosesOptimizerShard(), cfg, "step2", {"step": 2, "config": to_dict(cfg)}, {})
    assert C.read_latest(C.checkpoint_dir(cfg)) == "step1"


def _manifest(cfg, world_size=2, shapes=None) -> dict:
    return {"tag": "step8", "config": json.loads(json.dumps(to_dict(cfg))), "world_size": world_size,
            "zero_stage": 3, "param_shapes": shapes or {"w": [64, 64]}}


def test_changed_model_shape_is_refused_with_the_key_and_both_values(tmp_path):
    saved, now = _cfg(tmp_path), _cfg(tmp_path, "model.embed_dim=32", "model.text.depth=3")
    with pytest.raises(C.CheckpointError) as err:
        C.check_compatible(_manifest(saved), to_dict(now), {"w": [64, 64]}, 2, 3)
    assert "model.embed_dim: 64 -> 32" in str(err.value) and "model.text.depth: 2 -> 3" in str(err.value)


def test_a_checkpoint_older_than_a_shape_key_is_compared_with_its_legacy_value(tmp_path):
    """A manifest written before model.vision.layout existed holds a timm-layout ViT: resuming it under the new
    default names the key (docs/export.md)."""
    manifest = _manifest(_cfg(tmp_path, "model.vision.layout=timm"))
    del manifest["config"]["model"]["vision"]["layout"]
    with pytest.raises(C.CheckpointError, match="model.vision.layout: 'timm' -> 'clip'"):
        C.check_compatible(manifest, to_dict(_cfg(tmp_path)), {"w": [64, 64]}, 2, 3)
    C.check_compatible(manifest, to_dict(_cfg(tmp_path, "model.vision.layout=timm")), {"w": [64, 64]}, 2, 3)


def test_changed_lr_and_schedule_are_allowed_and_listed(tmp_path):
    saved = _cfg(tmp_path)
    now = _cfg(tmp_path, "optim.lr=0.002", "optim.schedule=constant", "model.decoder.dropout=0.0",
               "train.resume=latest")
    allowed = C.check_compatible(_manifest(saved), to_dict(now), {"w": [64, 64]}, 2, 3)
    assert allowed == {"optim.lr": (0.001, 0.002), "optim.schedule": ("cosine", "constant"),
                       "model.decoder.dropout": (0.1, 0.0)}


def test_world_size_zero_stage_and_parameter_shapes_are_checked(tmp_path):
    cfg = to_dict(_cfg(tmp_path))
    with pytest.raises(C.CheckpointError, match="world size: 2 -> 4"):
        C.check_compatible(_manifest(_cfg(tmp_path)), cfg, {"w": [64, 64]}, 4, 3)
    with pytest.raises(C.CheckpointError, match="ZeRO stage: 3 -> 2"):
        C.check_compatible(_manifest(_cfg(tmp_path)), cfg, {"w": [64, 64]}, 2, 2)
    with pytest.raises(C.CheckpointError, match=r"parameter w: \[64, 64\] -> \[64, 80\]; parameter x: absent"):
        C.check_compatible(_manifest(_cfg(tmp_path)), cfg, {"w": [64, 80], "x": [1]}, 2, 3)


# ------------------------------------------------------- slow: real saving processes killed with SIGKILL


class Tiny(torch.nn.Module):
    """A small module whose shapes follow model.embed_dim (the save path does not care what the model is)."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = torch.nn.Linear(width, width), torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def _checksum(engine) -> list:
    """Sum and sum of squares of every (partitioned) parameter: equal only for the same weights."""
    flat = torch.cat([getattr(p, "ds_tensor", p).detach().double().flatten() for p in engine.module.parameters()])
    return [flat.sum().item(), (flat * flat).sum().item()]


def _kill_during_save(kill_at: int, events: Path | None) -> None:
    """Log every file operation of the save; SIGKILL this process at the kill_at-th one (1-based; 0: never):
    in the middle of a torch.save (half the bytes written) or an rmtree (one file removed), or just before a
    rename/replace."""
    count = 0
    real_save, real_rmtree = torch.save, shutil.rmtree

    def event(kind: str, path) -> bool:
        nonlocal count
        count += 1
        with open(events, "a") as f:
            f.write(f"{kind} {Path(path).parent.name}/{Path(path).name}\n")
        return count == kill_at

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and event("write", f):
            buf = io.BytesIO()
            real_save(obj, buf)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            die()
        return real_save(obj, f, *args, **kwargs)

    def rename_like(real, kind):
        def op(src, dst, *args, **kwargs):
            if event(kind, dst):
                die()
            return real(src, dst, *args, **kwargs)
        return op

    def rmtree(path, *args, **kwargs):
        if event("rmtree", path):
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    torch.save, shutil.rmtree = save, rmtree
    os.replace, os.rename = rename_like(os.replace, "replace"), rename_like(os.rename, "rename")


def _child(args: dict) -> None:
    """One saving process (1 rank, DeepSpeed ZeRO-3): load `latest` if there is one, then for each entry of
    args['saves'] ("new" or "same" step) train one step and save, logging the file operations of save i to
    events.i; the save args['kill_at'] = [i, n] names is killed at its n-th file operation."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)
    import deepspeed

    cfg = load_config("configs/tiny-cpu.yaml", [f"train.output_dir={args['run']}", "train.keep_last=1",
                                                "train.resume=latest", "monitor.tensorboard=false",
                                                "train.micro_batch_size=4", *args.get("overrides", [])])
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("nlip_ds.run.checkpoint").addHandler(handler)
    E.init_distributed(cfg)
    torch.manual_seed(0)
    model = Tiny(cfg.model.embed_dim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr),
                                      config=E.build_ds_config(cfg, 1))
    report, step, generation = {}, 0, 0
    found = C.resolve_resume(cfg)
    if found:
        try:
            shared, mine = T.load_checkpoint(engine, cfg, *found)
        except C.CheckpointError as exc:
            report["error"] = str(exc)
        else:
            step, generation = shared["step"], mine["generation"]
            report.update(loaded=found[1], step=step, generation=generation,
                          weights_match=_checksum(engine) == shared["checksum"], warnings=warnings)
    Path(args["report"]).write_text(json.dumps(report))
    kill_save, kill_at = args.get("kill_at", [-1, 0])
    for i, kind in enumerate(args.get("saves", [])):
        loss = engine(torch.randn(4, cfg.model.embed_dim, generator=torch.Generator().manual_seed(step)))
        engine.backward(loss)
        engine.step()
        step, generation = step + (kind == "new"), generation + 1
        shared = {"step": step, "epoch": 0, "config": to_dict(cfg), "git_sha": "test", "checksum": _checksum(engine)}
        _kill_during_save(kill_at if i == kill_save else 0, Path(f"{args['events']}.{i}"))
        T.save_checkpoint(engine, cfg, f"step{step}", shared, {"generation": generation})
        torch.save, shutil.rmtree, os.replace, os.rename = REAL_IO
        report["committed"] = {"step": step, "generation": generation}
        Path(args["report"]).write_text(json.dumps(report))


REAL_IO = (torch.save, shutil.rmtree, os.replace, os.rename)


def _spawn(tmp: Path, run: Path, **args) -> tuple[int, dict, list[list[str]]]:
    """Run _child in a fresh process: (return code, its report, the file operations of each save)."""
    report, events = tmp / "report.json", tmp / "events"
    for p in [report, *tmp.glob("events.*")]:
        p.unlink(missing_ok=True)
    spec = json.dumps({"run": str(run), "report": str(report), "events": str(events), **args})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, spec], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-4000:]
    logged = [Path(f"{events}.{i}").read_text().splitlines() for i in range(len(args.get("saves", [])))
              if Path(f"{events}.{i}").is_file()]
    return proc.returncode, json.loads(report.read_text()) if report.is_file() else {}, logged


def _state(root: Path) -> dict:
    """What `latest` names, checked file by file; the generation (count of saves) that wrote it."""
    name = C.read_latest(root)
    manifest = C.verify_checkpoint(root / name)
    rank_state = torch.load(root / name / "rank_state_00000.pt", weights_only=True)
    return {"name": name, "step": manifest["step"], "generation": rank_state["generation"]}


def _kill_points(new: list[str], same: list[str]) -> list[tuple[str, int]]:
    """Where to kill, as (save kind, 1-based operation): in a new step's save, in the middle of the first and
    the last file write and at every operation from the manifest on (commit, `latest`, pruning); in a save of
    the same step again, at every rename and at the final `latest` (the swap of the folder `latest` names)."""
    writes = [i for i, e in enumerate(new, 1) if e.startswith("write")]
    manifest = next(i for i, e in enumerate(new, 1) if e.endswith("/manifest.json"))
    points = [("new", n) for n in [writes[0], writes[-1], *range(manifest, len(new) + 1)]]
    swaps = [i for i, e in enumerate(same, 1) if e.startswith("rename")]
    return points + [("same", n) for n in [*swaps, max(i for i, e in enumerate(same, 1) if e.endswith("/latest"))]]


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    """A first checkpoint, a new step and the same step again, their file operations logged; then one process
    per kill point: it loads what the kill before it left, saves a new step (which also clears the leftovers,
    so that the next save meets the state the logged one met) and gets killed in the save after that."""
    tmp = tmp_path_factory.mktemp("kill")
    run = tmp / "run"
    root = run / "checkpoints"
    rc, _, (_, new, same) = _spawn(tmp, run, saves=["new", "new", "same"])
    assert rc == 0
    records = []
    for kind, n in _kill_points(new, same):
        rc, report, (_, events) = _spawn(tmp, run, saves=["new", kind], kill_at=[1, n])
        records.append({"kind": kind, "killed": rc == -signal.SIGKILL, "at": events[-1], "loaded": report,
                        "planned": (new if kind == "new" else same)[n - 1], "after": _state(root)})
    _, final, _ = _spawn(tmp, run, overrides=["optim.lr=0.002"])
    return {"run": run, "records": records, "final": final, "tmp": tmp}


@pytest.mark.slow
def test_kill9_during_saves_leaves_latest_complete_and_the_previous_checkpoint_intact(killed_saves):
    records = killed_saves["records"]
    assert all(r["killed"] for r in records), [r["at"] for r in records if not r["killed"]]
    assert {r["at"].split()[0] for r in records} == {"write", "replace", "rename", "rmtree"}
    for r in records:
        where = f"killed at {r['at']} (save of a {r['kind']} step)"
        assert r["at"].split()[0] == r["planned"].split()[0], where  # the save did what the plan expected
        before, after = r["loaded"]["committed"], r["after"]
        # _state verified every file of what `latest` names: the checkpoint before the save, or the new one.
        assert after["generation"] in (before["generation"], before["generation"] + 1), where
        if after["generation"] == before["generation"]:
            assert after["step"] == before["step"], where


@pytest.mark.slow
def test_each_process_loads_what_the_kill_before_it_left_with_the_same_weights(killed_saves):
    records = killed_saves["records"]
    for prev, r in zip(records, records[1:] + [{"loaded": killed_saves["final"]}]):
        loaded = r["loaded"]
        assert "error" not in loaded, loaded.get("error")
        assert [loaded["generation"], loaded["step"]] == [prev["after"]["generation"], prev["after"]["step"]]
        assert loaded["weights_match"], f"weights differ from those saved, after a kill at {prev['at']}"


@pytest.mark.slow
def test_changed_lr_loads_with_a_warning_and_changed_shape_is_refused(killed_saves):
    final = killed_saves["final"]
    assert "error" not in final and final["weights_match"]
    assert [w for w in final["warnings"] if "optim.lr: 0.001 -> 0.002" in w], final["warnings"]
    _, shape, _ = _spawn(killed_saves["tmp"], killed_saves["run"], overrides=["model.embed_dim=32"])
    assert "does not fit this run" in shape["error"] and "model.embed_dim: 64 -> 32" in shape["error"]
    assert "parameter a.weight: [64, 64] -> [32, 32]" in shape["error"]


@pytest.mark.slow
def test_the_next_save_removes_what_killed_saves_left(killed_saves):
    root = killed_saves["run"] / "checkpoints"
    assert any(p.name.endswith((".partial", ".old")) for p in root.iterdir()), "the kills should leave leftovers"
    tmp, run = killed_saves["tmp"], killed_saves["run"]
    assert _spawn(tmp, run, saves=["new"])[0] == 0
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [C.read_latest(root)], f"keep_last=1 should leave only the latest checkpoint: {folders}"


# -------------------------------------------------- slow + dist: kill -9 a 2-rank run, resume, compare


def _launch(synth_dir: Path, tok: Path, run: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}", f"data.test={synth_dir / 'test'}",
           f"data.tokenizer={tok}", f"train.output_dir={run}",
           "train.micro_batch_size=16", "data.workers=1", "monitor.progress=false", "monitor.log_every=1",
           "eval.enabled=false", "train.epochs=2", "train.max_steps=14", "noise.warmup_epochs=1",
           "train.save_every=4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Output into a file (nobody reads a pipe while the test polls); its own process group, so that the
    # launcher, both ranks and their loader workers die together.
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-6000:]
    return log.read_text()


def _losses(run: Path) -> dict:
    """train/loss by step; a step logged again after a resume keeps its last value."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # the line the kill cut short
            continue
        if "train/loss" in m:
            out[m["step"]] = m["train/loss"]
    return out


STEPS_PER_EPOCH = 9  # 250 samples over 2 ranks x 16, the last batch padded


def _kill_between_checkpoints(proc: subprocess.Popen, run: Path) -> tuple[int, int]:
    """SIGKILL the whole run once a checkpoint exists and a later step, not the last of an epoch, was logged:
    (checkpoint step, last logged step) at the kill."""
    root = run / "checkpoints"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        name = C.read_latest(root) if root.is_dir() else None
        logged = max(_losses(run), default=0) if (run / "metrics.jsonl").is_file() else 0
        saved = int(STEP_TAG.match(name).group(1)) if name else None
        if saved is not None and logged > saved and logged % STEPS_PER_EPOCH:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return saved, logged
        time.sleep(0.05)
    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed between checkpoints")


@pytest.mark.slow
@pytest.mark.dist
def test_kill9_mid_epoch_then_resume_latest_matches_uninterrupted_run(synth_dir, tmp_path):
    from nlip_ds.run.model import load_run_model

    tok, full, killed = tmp_path / "tokenizer", tmp_path / "full", tmp_path / "killed"
    logs = [tmp_path / f"{name}.log" for name in ("full", "killed", "resumed")]
    _finish(_launch(synth_dir, tok, full, logs[0]), logs[0])
    ckpt_step, killed_at = _kill_between_checkpoints(_launch(synth_dir, tok, killed, logs[1]), killed)
    out = _finish(_launch(synth_dir, tok, killed, logs[2], "train.resume=latest"), logs[2])
    assert f"resumed from {killed / 'checkpoints'}" in out and "steps / epochs  14 / 1" in out
    want, got = _losses(full), _losses(killed)
    assert ckpt_step < killed_at < 14, "the kill should fall between checkpoints, mid-epoch"
    assert sorted(got) == sorted(want) == list(range(1, 15))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    full_model, killed_model = load_run_model(full)[0].state_dict(), load_run_model(killed)[0].state_dict()
    for name, w in full_model.items():
        torch.testing.assert_close(killed_model[name], w, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
