"""The demo's last lines: this run's evaluation beside a CLIP-loss run's at the same budget on the same data.

The CLIP-loss figures are measured, not assumed: `--record RUN` stores a finished CLIP-loss demo run's numbers
in scripts/demo_clip_reference.json with the command, commit and date that produced them; that file is
produced by

    DEMO_RUN=runs/tiny-cpu-clip bash scripts/demo.sh noise.enabled=false
    python scripts/demo_compare.py --record runs/tiny-cpu-clip

and the demo then prints `python scripts/demo_compare.py runs/tiny-cpu` at its end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "scripts" / "demo_clip_reference.json"
SHOWN = (("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "image->text R@1"), ("t2i_r1", "text->image R@1"),
         ("i2t_r5", "image->text R@5"), ("t2i_r5", "text->image R@5"))


def _summary(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: has the run finished?")
    return json.loads(path.read_text())


def record(run: Path) -> None:
    summary = _summary(run)
    import yaml

    if yaml.safe_load((run / "config.yaml").read_text())["noise"]["enabled"]:
        raise ValueError(f"{run}: noise.enabled is not false; the reference must be a CLIP-loss run")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    REFERENCE.write_text(json.dumps({
        "what": "the demo trained with the CLIP loss only (noise.enabled=false), same data, config and budget",
        "command": "DEMO_RUN=runs/tiny-cpu-clip bash scripts/demo.sh noise.enabled=false",
        "commit": sha.strip(), "date": datetime.date.today().isoformat(),
        "steps": summary["steps"], "world_size": summary["world_size"], "eval": summary["eval"]}, indent=2) + "\n")
    print(f"recorded {run}'s evaluation in {REFERENCE}")


def compare(run: Path) -> str:
    mine = _summary(run)["eval"]
    if not REFERENCE.is_file():
        return f"(no CLIP-loss reference in {REFERENCE}: see scripts/demo_compare.py)"
    ref = json.loads(REFERENCE.read_text())
    lines = ["", f"=== this run vs the CLIP loss at the same budget (measured at commit {ref['commit']} on "
             f"{ref['date']}: {ref['command']}) ===", f"{'':18s} {'this run':>9s} {'CLIP loss':>9s}"]
    for key, name in SHOWN:
        if key in mine and key in ref["eval"]:
            lines.append(f"{name:18s} {mine[key]:9.3f} {ref['eval'][key]:9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished demo run folder")
    p.add_argument("--record", action="store_true", help="store RUN (a CLIP-loss run) as the reference")
    args = p.parse_args(argv)
    try:
        if args.record:
            record(Path(args.run))
        else:
            print(compare(Path(args.run)))
    except (OSError, ValueError) as exc:
        print(f"demo_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
