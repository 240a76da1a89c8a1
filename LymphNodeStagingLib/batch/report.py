"""The cohort report PNG of a batch run: case status, N-stage distribution and per-station positivity."""

from __future__ import annotations

from pathlib import Path

from ..io.files import write_figure
from ..staging.rules import N_STAGES


def _stations() -> list[str]:
    from ..staging.stations import STATION_NAMES

    return list(STATION_NAMES)


def report_figures(rows: list[dict]) -> dict:
    """The numbers the report draws (also useful on their own): counts per status, N-stage, station positivity."""
    stations = _stations()
    ok = [r for r in rows if r.get("status") == "ok"]
    assessed = [r for r in ok if r.get("n_stage")]
    status = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "pending")}
    predicted = {n: sum(1 for r in assessed if r["n_stage"] == n) for n in N_STAGES}
    reference = {n: sum(1 for r in rows if r.get("n_stage_reference") == n) for n in N_STAGES}
    positivity = {s: (sum(1 for r in assessed if s in str(r.get("positive_stations", "")).split(";")) / len(assessed)
                      if assessed else None) for s in stations}
    labelled = [r for r in rows if r.get("positive_stations_reference") not in (None, "unknown")]
    ref_positivity = {s: (sum(1 for r in labelled if s in str(r["positive_stations_reference"]).split(";"))
                          / len(labelled) if labelled else None) for s in stations}
    return {"status": status, "assessed": len(assessed), "n_stage_predicted": predicted,
            "n_stage_reference": reference, "station_positivity": positivity,
            "station_positivity_reference": ref_positivity}


def write_report(rows: list[dict], path: str | Path, steps: list[str] | None = None) -> Path:
    """Draw the three panels and write the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig_data = report_figures(rows)
    stations = _stations()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1.4, 3]})
    # 1. status
    ax = axes[0]
    names = list(fig_data["status"])
    vals = [fig_data["status"][n] for n in names]
    bars = ax.bar(names, vals, color=["#4c9a5b", "#c0392b", "#999999"])
    ax.bar_label(bars)
    ax.set_title(f"Cases ({len(rows)})")
    ax.set_ylabel("cases")
    # 2. N-stage distribution
    ax = axes[1]
    x = np.arange(len(N_STAGES))
    ref = [fig_data["n_stage_reference"][n] for n in N_STAGES]
    pred = [fig_data["n_stage_predicted"][n] for n in N_STAGES]
    b1 = ax.bar(x - 0.2, ref, 0.4, label="cohort label", color="#9db4d6")
    ax.bar_label(b1)
    if fig_data["assessed"]:
        b2 = ax.bar(x + 0.2, pred, 0.4, label="assessed", color="#2c5d9e")
        ax.bar_label(b2)
    ax.set_xticks(x, N_STAGES)
    ax.set_title("N-stage distribution" + ("" if fig_data["assessed"] else " (no assess step yet)"))
    ax.set_ylabel("cases")
    ax.legend(loc="upper right", fontsize=8)
    for a in axes[:2]:
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    # 3. per-station positivity
    ax = axes[2]
    xs = np.arange(len(stations))
    refp = [fig_data["station_positivity_reference"][s] for s in stations]
    if fig_data["assessed"]:
        pos = [fig_data["station_positivity"][s] for s in stations]
        ax.bar(xs, [p or 0.0 for p in pos], 0.6, color="#d9822b", label=f"assessed positive (n={fig_data['assessed']})")
    if any(v is not None for v in refp):
        ax.plot(xs, [np.nan if v is None else v for v in refp], "k_", markersize=14, mew=2,
                label="cohort label positive")
    ax.set_xticks(xs, stations, rotation=0, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of cases")
    ax.set_title("Per-station positivity")
    ax.legend(loc="upper right", fontsize=8)
    title = "Cohort run" + (f" - steps {','.join(steps)}" if steps else "")
    fig.suptitle(title)
    fig.tight_layout()
    return write_figure(fig, path, dpi=90)
