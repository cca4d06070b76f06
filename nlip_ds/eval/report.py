"""Where `nlip-ds eval` results go: a text table (the CLI prints it), a results JSON, eval/ TensorBoard tags."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from nlip_ds.monitor import MetricSink

logger = logging.getLogger(__name__)

MAX_LISTED = 10  # skipped files and per-class rows beyond this are in the JSON only


def format_table(results: dict) -> str:
    lines = [f"{', '.join(results['tasks'])} on {results['data']}: {results['num_images']} images"
             + (f", {results['num_captions']} captions" if "num_captions" in results else "")]
    lines += [f"  {name:<32} {value:8.4f}" for name, value in results["metrics"].items()]
    for name, reason in results.get("notes", {}).get("missing", {}).items():
        lines.append(f"  {name:<32} {'missing':>8}  ({reason})")
    per_class = results.get("per_class", {})
    if per_class:
        lines.append("  per-class top-1:")
        lines += [f"    {n:<30} {c['top1']:8.4f}  ({c['count']} images)"
                  for n, c in list(per_class.items())[:MAX_LISTED]]
    skipped = results.get("skipped", [])
    if skipped:
        lines.append(f"  skipped {len(skipped)} input(s):")
        lines += [f"    {s['file']}: {s['reason']}" for s in skipped[:MAX_LISTED]]
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", path)
    return path


def log_tensorboard(results: dict, folder: str | Path, step: int) -> None:
    """The scalar metrics as eval/<name> at the checkpoint's step (the same tags the end-of-training
    evaluation writes)."""
    sink = MetricSink(folder, enabled=True, tensorboard=True)
    try:
        sink.log({f"eval/{k}": v for k, v in results["metrics"].items()}, step)
    finally:
        sink.close()
