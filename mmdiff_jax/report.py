"""Print the README's results tables from the workdirs of finished runs.

    python -m mmdiff_jax.report runs/*
    python -m mmdiff_jax.report runs/digits runs/digits/eval_dpm25.json

Each workdir (or `workdir/eval_<tag>.json`, from `--config.eval.tag=<tag> --mode eval`) contributes one row from its
`eval.json` (metrics) and `train_summary.json` (training wall time). Rows
are grouped by dataset (one table each, in the order the workdirs are given), and a table shows only the columns
that some of its rows have.
"""

from __future__ import annotations

import json
import os
import sys

COLUMNS = [
    ("label agreement", "label/agreement", "{:.3f}"),
    ("rarest class", "label/min_class_fraction", "{:.3f}"),
    ("image→label acc.", "label/image_to_label_accuracy", "{:.3f}"),
    ("label→image acc.", "label/label_to_image_accuracy", "{:.3f}"),
    ("rarest class (evaluator)", "image/min_class_fraction_evaluator", "{:.3f}"),
    ("Fréchet dist.", "image/frechet_distance", "{:.2f}"),
    ("precision", "image/precision", "{:.3f}"),
    ("recall", "image/recall", "{:.3f}"),
    ("image→mask mIoU", "mask/image_to_mask_miou", "{:.3f}"),
    ("image→mask pixel acc.", "mask/image_to_mask_pixel_accuracy", "{:.3f}"),
    ("joint mask consistency mIoU", "mask/joint_consistency_miou", "{:.3f}"),
    ("mask→image acc.", "mask/mask_to_image_accuracy", "{:.3f}"),
    ("mask→label acc.", "mask/mask_to_label_accuracy", "{:.3f}"),
    ("embedding cos. to its image's", "embedding/cosine_to_image_embedding", "{:.3f}"),
    ("same, shuffled (chance)", "embedding/cosine_to_image_embedding_shuffled", "{:.3f}"),
]


INPAINTING = [("masked MSE", "masked_mse", "{:.3f}"), ("PSNR dB", "psnr_db", "{:.2f}"), ("LPIPS", "lpips", "{:.3f}")]


def _inpainting_columns(evals: list[dict]) -> list[tuple[str, str, str]]:
    """Columns for every `inpaint_<n>sq/...` metric some row has, by number of squares."""
    counts = sorted({int(k.split("/")[0][len("inpaint_"):-2]) for ev in evals for k in ev if k.startswith("inpaint_")})
    return [(f"{n} sq. {name}", f"inpaint_{n}sq/{key}", fmt) for n in counts for name, key, fmt in INPAINTING]


def _dynamic_columns(evals: list[dict]) -> list[tuple[str, str, str]]:
    """Guided label -> image accuracy per weight, the FD without the label, and bits/dim per modality."""
    keys = sorted({k for ev in evals for k in ev}, key=lambda k: (k.split("_guidance_")[0],) + _guidance_setting(k))
    guided = [(_guidance_column(k), k, "{:.3f}") for k in keys
              if k.startswith("label/label_to_image_accuracy_guidance_")]
    without = [("Fréchet dist. without label", k, "{:.2f}") for k in keys if k == "image/frechet_distance_without_label"]
    bpd = [(f"bits/dim {k[4:]}", k, "{:.3f}") for k in keys if k.startswith("bpd/") and k != "bpd/total"]
    total = [("bits/dim total", "bpd/total", "{:.3f}")] if "bpd/total" in keys else []
    return guided + without + bpd + total


def _guidance_setting(key: str) -> tuple[int, int, float]:
    """(t_min, t_max, weight) of a guided key: `..._guidance_2` -> (-1, -1, 2.0) (the configured interval, first),
    `..._guidance_2_t200-1000` -> (200, 1000, 2.0); other keys (-1, -1, 0.0)."""
    setting = key.split("_guidance_")[-1] if "_guidance_" in key else ""
    weight, _, interval = setting.partition("_t")
    try:
        low, high = (int(v) for v in interval.split("-")) if interval else (-1, -1)
        return low, high, float(weight)
    except ValueError:
        return -1, -1, 0.0


def _guidance_column(key: str) -> str:
    """`..._guidance_2` -> 'label→image acc., guidance 2'; `..._guidance_2_t200-1000` -> the same + ', t 200-1000'."""
    low, high, _ = _guidance_setting(key)
    weight = key.split("_guidance_")[-1].partition("_t")[0]
    return f"label→image acc., guidance {weight}" + (f", t {low}-{high}" if low >= 0 else "")


def _load(workdir: str) -> tuple[dict, dict, str]:
    """A workdir (its eval.json) or an eval_<tag>.json inside one."""
    eval_path = workdir if workdir.endswith(".json") else os.path.join(workdir, "eval.json")
    workdir = os.path.dirname(eval_path)
    if not os.path.exists(eval_path):
        raise SystemExit(f"error: no {eval_path}: run the main job (or --mode eval) on it first.")
    with open(eval_path) as f:
        ev = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    summary_path = os.path.join(workdir, "train_summary.json")
    train_time = "–"
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        train_time = f"{summary['seconds'] / 60:.1f} min"
    return ev, config, train_time


def _row_name(path: str) -> str:
    """runs/x -> x; runs/x/eval_dpm25.json -> x (dpm25)."""
    if path.endswith(".json"):
        tag = os.path.basename(path)[len("eval_"):-len(".json")]
        return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))} ({tag})"
    return os.path.basename(os.path.normpath(path))


def table(workdirs: list[str]) -> str:
    """One markdown table; columns no row has are left out."""
    loaded = [(w, *_load(w)) for w in workdirs]
    evals = [ev for _, ev, _, _ in loaded]
    columns = [c for c in COLUMNS if any(c[1] in ev for ev in evals)] + _inpainting_columns(evals)
    columns += _dynamic_columns(evals)
    header = ["run", "modalities", "steps", "train time"] + [name for name, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workdir, ev, config, train_time in loaded:
        modalities = "+".join(sorted(config["modalities"], key=lambda n: n != config["primary"]))
        cells = [_row_name(workdir), modalities, str(ev["step"]), train_time]
        cells += [fmt.format(ev[key]) if key in ev else "–" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(workdirs: list[str]) -> str:
    """A table per dataset (`data.source`), in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for w in workdirs:
        groups.setdefault(_load(w)[1]["data"]["source"], []).append(w)
    return "\n\n".join(f"**{source}**\n\n{table(ws)}" for source, ws in groups.items())


if __name__ == "__main__":
    print(tables(sys.argv[1:]))
