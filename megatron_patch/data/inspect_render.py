"""Presenting an inspection: a readable summary, samples as text, a self-contained HTML page.

The HTML page inlines thumbnails as base64 PNG, so it can be mailed or opened from a cluster
scratch folder without the shards beside it.
"""
import base64
import html
import io
import unicodedata
from typing import List, Sequence

from PIL import Image

from megatron_patch.data.image_view import model_view
from megatron_patch.data.sample_check import CheckedSample
from megatron_patch.data.shard_scan import Problem

THUMBNAIL_SIDE = 160
_ROLE_LABELS = {"system": "SYSTEM", "human": "USER", "gpt": "ASSISTANT"}


def format_summary(dataset_dir: str, stats: dict, problems: Sequence[Problem],
                   validated: bool, max_problems: int = 200) -> str:
    lines = [f"dataset {dataset_dir}"]
    for split, s in stats["splits"].items():
        lines.append(f"  {split:<6} {s['shards']:>5} shard(s) {s['samples']:>9} samples "
                     f"{s['bytes'] / 1e6:>10.1f} MB")
    lines.append(f"  total  {stats['samples']} samples, {stats['images']} images "
                 f"({stats['seconds']} s)")
    lines.append("parts per sample: " + _counts(stats["parts_per_sample"]))
    lines.append("images per sample: " + _counts(stats["images_per_sample"]))
    lines.append("image sizes (WxH): " + _counts(stats["image_sizes"], limit=12))
    lines.append("image formats: " + _counts(stats["image_formats"]))
    lines.append("turns per sample: " + _counts(stats["turns_per_sample"]))
    lines.append("text chars per sample: " + _summary(stats["text_chars"]))
    if "tokens" in stats:
        tokens = stats["tokens"]
        lines.append(f"tokens per sample (max_pixels {tokens['max_pixels']}): "
                     + _summary(tokens["total"]))
        lines.append("  of which image tokens: " + _summary(tokens["image"]))
        if tokens["seq_length"] is not None:
            share = tokens["over_seq_length"] / max(1, tokens["total"].get("count", 0))
            examples = ", ".join(tokens["over_seq_length_examples"][:3])
            lines.append(f"  longer than --seq-length {tokens['seq_length']}: "
                         f"{tokens['over_seq_length']} ({share:.1%})"
                         + (f", e.g. {examples}" if examples else ""))
    if problems:
        lines.append(f"PROBLEMS: {len(problems)}")
        lines += [f"  {p}" for p in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (see --json)")
    else:
        lines.append("no problems found" + ("" if validated else
                                            " (run with --validate to decode every image)"))
    return "\n".join(lines)


def _counts(counts: dict, limit: int = 20) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:limit])
    return (text + f", ... ({len(items) - limit} more)") if len(items) > limit else (text or "-")


def _summary(summary: dict) -> str:
    if not summary.get("count"):
        return "-"
    return (f"min {summary['min']}, mean {summary['mean']}, p50 {summary['p50']}, "
            f"p95 {summary['p95']}, max {summary['max']}")


def format_sample(checked: CheckedSample) -> str:
    lines = [f"--- {checked.shard}:{checked.key}"]
    sample = checked.sample
    if sample is None:
        lines += [f"  !! {p.message}" for p in checked.problems]
        return "\n".join(lines)
    lines.append(f"  id {sample.id}  source {sample.source}")
    for name, info in zip(sample.image_names, checked.images):
        lines.append(f"  image {name}: {info.width}x{info.height} {info.format}")
    if sample.meta:
        lines.append(f"  meta {sample.meta}")
    for turn in sample.conversations:
        label = _ROLE_LABELS.get(turn["from"], turn["from"])
        lines.append(f"  {label}: " + _visible(turn["value"]).replace("\n", "\n    "))
    lines += [f"  !! {p.message}" for p in checked.problems]
    return "\n".join(lines)


def _visible(text: str) -> str:
    """Control characters other than newline and tab as escapes (a NUL or a carriage return
    printed raw garbles the terminal and hides what the text holds)."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc"
                   else repr(c)[1:-1] for c in text)


def write_html(path: str, dataset_dir: str, samples: List[CheckedSample]) -> int:
    """Writes the page; returns the number of thumbnails embedded."""
    thumbnails = 0
    body = []
    for checked in samples:
        body.append(f"<section><h3>{_e(checked.shard)}:{_e(checked.key)}</h3>")
        sample = checked.sample
        if sample is not None:
            body.append(f"<p class=meta>id {_e(sample.id)} &middot; {_e(sample.source)}</p><div>")
            for name, data in zip(sample.image_names, sample.images):
                uri = _thumbnail_uri(data)
                if uri is None:
                    body.append(f"<span class=bad>{_e(name)}: does not decode</span>")
                else:
                    body.append(f'<img src="{uri}" title="{_e(name)}" alt="{_e(name)}">')
                    thumbnails += 1
            body.append("</div>")
            for turn in sample.conversations:
                body.append(f"<div class=\"turn {_e(turn['from'])}\"><b>"
                            f"{_ROLE_LABELS.get(turn['from'], _e(turn['from']))}</b> "
                            f"<pre>{_e(turn['value'])}</pre></div>")
        body += [f"<p class=bad>{_e(p.message)}</p>" for p in checked.problems]
        body.append("</section>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{_e(dataset_dir)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(dataset_dir)}</h1>"
            f"<p>{len(samples)} sample(s)</p>{''.join(body)}</body></html>\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return thumbnails


def _thumbnail_uri(data: bytes):
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            thumb = model_view(image)  # what the model sees
    except Exception:  # a corrupt image is shown as text, not as a broken page
        return None
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value) -> str:
    return html.escape(str(value))


_CSS = ("body{font-family:sans-serif;max-width:60em;margin:auto}section{border-top:1px solid #ccc;"
        "padding:.5em 0}img{margin:2px;border:1px solid #999;image-rendering:pixelated;"
        "min-width:96px}pre{display:inline;white-space:pre-wrap}.meta{color:#666}"
        ".gpt{background:#eef6ee}.human{background:#eef0f8}.system{color:#666}.bad{color:#b00}")
