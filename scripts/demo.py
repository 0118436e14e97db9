"""`make demo`: phantoms -> a small trained model -> predictions on held-back studies.

Everything happens under ``demo/`` (ignored by git). The model is trained once and
reused while its bundle verifies; delete ``demo/`` to start over. The demo model is
trained on synthetic phantoms and every output it produces says so.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
TRAIN = DEMO / "train"
HOLDOUT = DEMO / "holdout"
MODEL = DEMO / "model"
RESULTS = DEMO / "results"
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def run(*args: str) -> None:
    print("$", " ".join(args[1:] if args[0] == sys.executable else args), flush=True)
    subprocess.run(args, check=True, cwd=REPO)


def ich_train(*args: str) -> None:
    run(sys.executable, "-m", "training.cli", *args)


def ich_node(*args: str) -> None:
    run(sys.executable, "-m", "ich_node.cli", *args)


def bundle_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    from ich_node.bundle import BundleError, load_bundle

    try:
        load_bundle(path)
    except BundleError as exc:
        print(f"cached model is not usable ({exc}); training again")
        return False
    return True


def truth_by_series(folder: Path) -> dict[str, dict[str, int]]:
    with open(folder / "phantom_truth.csv", newline="") as handle:
        return {
            row["series_instance_uid"]: {label: int(row[label]) for label in LABELS}
            for row in csv.DictReader(handle)
        }


def report() -> int:
    truth = truth_by_series(HOLDOUT)
    rows = []
    correct = total = 0
    for uid, labels in truth.items():
        path = RESULTS / uid / "findings.json"
        if not path.is_file():
            rows.append((uid, "missing", "", ""))
            continue
        findings = json.loads(path.read_text())
        predicted = {label for label in LABELS if findings["series"][label]["positive"]}
        actual = {label for label in LABELS if labels[label]}
        total += 1
        correct += predicted == actual
        p_any = findings["series"]["any"]["probability"]
        rows.append(
            (
                "..." + uid[-12:],
                ", ".join(sorted(actual - {"any"})) or "none",
                ", ".join(sorted(predicted - {"any"})) or "none",
                f"{p_any:.2f}",
            )
        )
    print()
    print("Held-back phantom studies: truth against the demo model")
    header = ("series", "truth (subtypes)", "predicted (subtypes)", "p(any)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\n{correct}/{total} series with exactly the right set of labels.")
    print(f"Findings, SR and heatmaps (with PNG previews) are in {RESULTS}/<SeriesInstanceUID>/.")
    print("DEMO model trained on synthetic phantoms: AI result for triage support, not a diagnosis.")
    return 0


def main() -> int:
    start = time.monotonic()
    DEMO.mkdir(exist_ok=True)
    if not (TRAIN / "stage_2_train.csv").is_file():
        ich_train("phantom", "--out", str(TRAIN), "--studies", "40", "--seed", "1")
    if not (HOLDOUT / "phantom_truth.csv").is_file():
        ich_train("phantom", "--out", str(HOLDOUT), "--studies", "8", "--seed", "2")
    bundle = MODEL / "model.safetensors"
    if not bundle_ok(bundle):
        ich_train(
            "fit",
            "--config", str(REPO / "config" / "train_demo.yaml"),
            "--images", str(TRAIN / "images"),
            "--labels", str(TRAIN / "stage_2_train.csv"),
            "--out", str(MODEL),
        )  # fmt: skip
    else:
        print(f"using the cached demo model {bundle} (delete demo/ to train again)")
    ich_node("predict", "--bundle", str(bundle), "--out", str(RESULTS), str(HOLDOUT / "images"))
    code = report()
    print(f"demo finished in {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
