"""Training time of the density-form FTT against the ResNet-MLP on ``dataset=gmm``, side by side.

The study (``benchmarks/tt_gmm_study.py``) records each run's ``train_s``, but its runs share the
CPU with whatever else runs, so two arms' times there can differ by the load. This script runs
the two arms of the study's cost question (``resnet`` and ``ftt_density``, the study's own
overrides) through ``train.py`` interleaved, A B A B ..., in one process at one thread, and prints
the median ``train_s`` of each with the parameter counts. The exact predictor's comparison is
switched off (``ddpm.oracle=false``): it costs sampling time, not training time. A run folder
holding a finished run of the same overrides is read, not rerun (the study's runner).

    python benchmarks/tt_gmm_train_time.py --out runs/tt_gmm_train_time     # D 10, 20; K 4, 8
    python benchmarks/tt_gmm_train_time.py --cells 10:4 --repeats 1 --out runs/quick
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tt_gmm_study  # noqa: E402

ARMS = ("resnet", "ftt_density")


def run_one(arm: str, dim: int, components: int, repeat: int, args) -> dict:
    """One run through the study's own runner (its overrides, command and reuse of a finished
    run), seed 0, in ``<out>/rep<repeat>/`` so that repeats are separate runs."""
    study_args = copy.copy(args)
    study_args.out = args.out / f"rep{repeat}"
    study_args.extra = [*args.extra, "ddpm.oracle=false"]
    row = tt_gmm_study.run_one(arm, dim, components, 0, study_args)
    if "error" in row:
        raise SystemExit(f"{arm} D={dim} K={components}: {row['error']}")
    return {"repeat": repeat, **{k: row[k] for k in ("arm", "dim", "components", "params")},
            "train_s": row["train_s"], "command": row["command"]}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| D | K | ResNet params | ResNet train s | density params (share) | density train s "
        "(ratio) | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(r["dim"], r["components"]) for r in rows})
    for dim, k in cells:
        arm = {
            a: [r for r in rows if (r["dim"], r["components"], r["arm"]) == (dim, k, a)]
            for a in ARMS
        }
        res, den = arm["resnet"], arm["ftt_density"]
        t_res = statistics.median(r["train_s"] for r in res)
        t_den = statistics.median(r["train_s"] for r in den)
        p_res, p_den = res[0]["params"], den[0]["params"]
        lines.append(
            f"| {dim} | {k} | {p_res:,} | {t_res:.1f} | {p_den:,} ({100 * p_den / p_res:.0f} %) | "
            f"{t_den:.1f} ({t_den / t_res:.2f}) | {len(res)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=["10:4", "10:8", "20:4", "20:8"], help="D:K")
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm per cell")
    p.add_argument("--steps", type=int, default=2000, help="as the study's --steps")
    p.add_argument("--sample-steps", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell in args.cells:
        dim, k = (int(v) for v in cell.split(":"))
        for repeat in range(args.repeats):
            for arm in ARMS:  # interleaved: both arms see the same load
                rows.append(run_one(arm, dim, k, repeat, args))
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "table.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
