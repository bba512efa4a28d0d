"""Print the README's results table from the workdirs of finished runs.

    python -m mmdiff_jax.report runs/digits runs/digits_image_only

Each workdir contributes one row from its `eval.json` (metrics) and `train_summary.json` (training wall time).
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
]


def row(workdir: str) -> str:
    if not os.path.exists(os.path.join(workdir, "eval.json")):
        raise SystemExit(f"error: no eval.json in {workdir}: run the main job (or --mode eval) on it first.")
    with open(os.path.join(workdir, "eval.json")) as f:
        ev = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    summary_path = os.path.join(workdir, "train_summary.json")
    train_time = "–"
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        train_time = f"{summary['seconds'] / 60:.1f} min"
    modalities = "+".join(sorted(config["modalities"], key=lambda n: n != config["primary"]))
    cells = [os.path.basename(os.path.normpath(workdir)), modalities, str(ev["step"]), train_time]
    cells += [fmt.format(ev[key]) if key in ev else "–" for _, key, fmt in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table(workdirs: list[str]) -> str:
    header = ["run", "modalities", "steps", "train time"] + [name for name, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [row(w) for w in workdirs]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
