"""report.html of `nlip-ds audit`: one static page, every image inside it as a base64 PNG.

No server, no script, no network: the page opens from disk or from an artifact store and can be mailed. It
shows what the audit measured (pairs, skips, the fitted mixture over the per-pair losses as a histogram, the
detection metrics when the shards carry ground truth) and the most suspicious pairs, lowest clean
probability first, each as its image, caption, clean probability and loss (and a caption that the model's
decoder writes for the image, with --recaption).
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from PIL import Image

THUMB = 160  # displayed side of a pair's image, in CSS pixels

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table.kv td { padding: 2px 12px 2px 0; } table.kv td:first-child { color: #666; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.pair { border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fafafa; }
.pair img { width: %dpx; height: %dpx; image-rendering: pixelated; display: block; margin: 0 auto 6px; }
.caption { font-weight: 600; } .recaption { color: #05a; } .meta { color: #666; font-size: 0.85em; }
.noisy { color: #b00; } .clean { color: #080; }
""" % (THUMB, THUMB)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail_png(img: Image.Image, side: int = THUMB) -> bytes:
    """The image fitted into side x side (never enlarged: the page scales small images up without blur)."""
    img = img.copy()
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _table(rows: dict) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                                          for k, v in rows.items()) + "</table>"


def _pair(p: dict) -> str:
    truth = p.get("noise_type")
    truth_html = (f"<div class='meta'>ground truth: <span class='{'clean' if truth == 'clean' else 'noisy'}'>"
                  f"{html.escape(truth)}</span></div>") if truth else ""
    train = p.get("train_clean_prob")
    train_html = "" if train is None else f" · training-time {train:.3f}"
    recaption = (f"<div class='recaption'>model: {html.escape(p['recaption'])}</div>"
                 if p.get("recaption") is not None else "")
    image = (f"<img alt='{html.escape(p['key'])}' src='{png_data_uri(p['png'])}'>" if p.get("png")
             else "<div class='meta'>(image unreadable)</div>")
    return (f"<div class='pair'>{image}<div class='caption'>{html.escape(p['caption'])}</div>{recaption}"
            f"<div class='meta'>clean probability <b>{p['clean_prob']:.3f}</b>{train_html} · loss "
            f"{p['loss']:.3f}</div>{truth_html}<div class='meta'>{html.escape(Path(p['shard']).name)}:"
            f"{html.escape(p['key'])}</div></div>")


def write_report(path: Path, info: dict, metrics: dict, histogram_png: bytes, suspicious: list[dict]) -> Path:
    """Write the page; `info` and `metrics` are flat dicts shown as tables, `suspicious` the pairs to show."""
    histogram = f"<img id='histogram' alt='loss histogram and fitted mixture' src='{png_data_uri(histogram_png)}'>"
    sections = [f"<h1>nlip-ds audit</h1>{_table(info)}", f"<h2>Per-pair loss and the fitted mixture</h2>{histogram}"]
    for name, values in metrics.items():
        sections.append(f"<h2>Detection of noisy pairs against ground truth ({html.escape(name)})</h2>"
                        f"{_table(values)}")
    sections.append(f"<h2>The {len(suspicious)} most suspicious pairs (lowest clean probability first)</h2>"
                    f"<div class='grid'>{''.join(_pair(p) for p in suspicious)}</div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>nlip-ds audit</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
