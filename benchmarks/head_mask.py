"""Head-mask benchmark: what keeping heatmap colour inside the head costs per series.

    python benchmarks/head_mask.py            # phantom of 40 and 160 slices, the GE series
    python benchmarks/head_mask.py --quick    # 16 slices at 256 px (CI)

``ich_node.imaging.head_mask`` runs once per series in the results stage (heatmaps and
parametric map, ``ich_node.results.sc.series_head_mask``). Rows: a 512x512 phantom
lying on its holder and table (``support=True``) of 40 slices, the same stack with each
slice four times (160 slices: the size of a 1.25 mm series), and the real
GE head CT in ``../shared/real-ct`` (28 slices, in a head holder) when it is there.
Each row is printed as soon as it is measured; rows stop once ``--budget`` seconds
are spent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_of, load_average, table, write_json
from ich_node.imaging import head_mask, load_series_hu, read_series
from training.phantom import make_volume

COLUMNS = ("series", "slices", "matrix", "s/series", "ms/slice", "head voxels %")
REPO = Path(__file__).resolve().parents[1]
#: The real GE series, where the tests look for it (``ICH_REAL_CT`` overrides).
GE = (
    Path(os.environ.get("ICH_REAL_CT", REPO.parent / "shared" / "real-ct"))
    / "neurolabusc+dcm_qa_ct"
    / "In"
    / "GE"
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 slices at 256 px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=300.0, help="seconds for all rows")
    p.add_argument("--json", type=Path, default=None)
    return p


def _cases(quick: bool) -> list[tuple[str, Any]]:
    """(name, loader) pairs; a loader returns (HU, pixel spacing) or None to skip."""

    def phantom(n: int, matrix: int, repeat: int = 1) -> Any:
        def load() -> tuple[np.ndarray, float]:
            vol = make_volume(np.random.default_rng(0), n_slices=n, matrix=matrix, support=True)
            hu = np.repeat(vol.hu.astype(np.float32), repeat, axis=0)
            return hu, vol.pixel_spacing_mm

        return load

    def ge() -> tuple[np.ndarray, tuple[float, float]] | None:
        if not GE.is_dir():
            return None
        series = read_series(sorted(GE.glob("*.dcm")))
        return load_series_hu(series), series.slices[0].pixel_spacing

    if quick:
        return [("phantom on holder and table", phantom(16, 256))]
    return [
        ("phantom on holder and table", phantom(40, 512)),
        # Each slice four times: the size of a thin-slice (1.25 mm) series of the head.
        ("the same, 4x thinner slices", phantom(40, 512, repeat=4)),
        ("real GE head CT (holder)", ge),
    ]


def main(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    print(table([], COLUMNS), flush=True)
    for name, load in _cases(args.quick):
        if time.monotonic() - start > args.budget:
            print(f"(budget of {args.budget:.0f} s spent: {name} not measured)", flush=True)
            break
        loaded = load()
        if loaded is None:
            print(f"({name}: not present, skipped)", flush=True)
            continue
        hu, spacing = loaded
        mask = head_mask(hu, spacing)  # warm-up (scipy import)
        seconds = best_of(lambda hu=hu, spacing=spacing: head_mask(hu, spacing), args.repeats)
        row = {
            "series": name,
            "slices": hu.shape[0],
            "matrix": f"{hu.shape[1]}x{hu.shape[2]}",
            "s/series": round(seconds, 4),
            "ms/slice": round(1000 * seconds / hu.shape[0], 2),
            "head voxels %": round(100 * float(mask.mean()), 1),
        }
        rows.append(row)
        print(table([row], COLUMNS).splitlines()[-1], flush=True)
    print(f"load average {load_average()}")
    write_json(args.json, "head_mask_quick" if args.quick else "head_mask", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
