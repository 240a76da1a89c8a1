"""The evaluation report: Markdown tables in the layout of the paper's Tables 4-6 (methods as rows, metrics as
columns, mean +- sd over folds), pooled values with bootstrap CIs, the paired tests, the per-fold cut-offs, the
figures (confusion matrices, a summary chart) and everything as JSON."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io.files import write_figure, write_json, write_text
from .metrics import markdown_table

CI_METRICS: tuple[tuple[str, str], ...] = (
    ("station.balanced_accuracy", "LNS BalAcc"), ("station.auc", "LNS AUC"), ("stage.accuracy", "N Acc"),
    ("stage.balanced_accuracy", "N BalAcc"), ("stage.qwk", "N QWK"), ("stage.n_auc", "N+ AUC"),
)


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _p(v: float) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _ci_table(run, level: str) -> str:
    lines = ["| method | " + " | ".join(h for _, h in CI_METRICS) + " |", "|---|" + "---|" * len(CI_METRICS)]
    for name, res in run.results.items():
        ev = res.pooled[level]
        cells = []
        for key, _ in CI_METRICS:
            iv = ev.ci.get(key)
            value = ev.values().get(key)
            if iv is None:
                cells.append(_fmt(value))
            else:
                cells.append(f"{_fmt(iv.estimate)} [{_fmt(iv.low)}, {_fmt(iv.high)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tests_table(run) -> str:
    lines = ["| comparison | stations: A right/B wrong | B right/A wrong | McNemar | p | "
             "AUC A | AUC B | AUC difference [95 % CI] | p | "
             "N: Acc A | Acc B | difference | permutation p | permutations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in run.comparisons:
        m, p, a = c.mcnemar, c.permutation, getattr(c, "auc", None)
        how = "exact binomial" if m.method.startswith("exact") else f"chi2 = {m.statistic:.2f}"
        perm = f"{p.n_permutations}{' (all)' if p.exact else ''}"
        auc = (f"{_fmt(a.auc_a)} | {_fmt(a.auc_b)} | {a.observed:+.3f} [{a.low:+.3f}, {a.high:+.3f}] | "
               f"{_p(a.p_value)}" if a is not None and a.n_boot else "– | – | – | –")
        lines.append(f"| {c.method_a} vs {c.method_b} | {m.b} | {m.c} | {how} | {_p(m.p_value)} | {auc} | "
                     f"{_fmt(p.metric_a)} | {_fmt(p.metric_b)} | {p.observed:+.2f} | {_p(p.p_value)} | {perm} |")
    return "\n".join(lines) + "\n"


def _cutoffs(run) -> str:
    keys = (("suv_threshold", "SUVmax t"), ("overlap_threshold", "overlap o"), ("threshold", "probability"))
    lines = []
    for name, preds in run.predictions.items():
        for key, label in keys:
            vals = [fp.params.get(key) for fp in preds]
            if all(v is not None for v in vals) and vals:
                lines.append(f"- {name}: {label} per fold " + ", ".join(f"{float(v):.2f}" for v in vals))
                break
    return "\n".join(lines) + "\n" if lines else ""


def summary_png(run, path: Path, level: str = "patient") -> Path:
    """Bar chart: station balanced accuracy and N-stage accuracy per method (mean +- sd over folds)."""
    from .plots import _pyplot

    plt = _pyplot()
    names = list(run.results)
    metrics = (("station.balanced_accuracy", "station balanced accuracy"), ("stage.accuracy", "N-stage accuracy"),
               ("stage.balanced_accuracy", "N-stage balanced accuracy"))
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.2))
    for i, (key, label) in enumerate(metrics):
        ms = [run.results[n].summary[level].get(key) for n in names]
        mean = [m.mean if m is not None else np.nan for m in ms]
        sd = [m.sd if m is not None and not math.isnan(m.sd) else 0.0 for m in ms]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, mean, width, yerr=sd, capsize=3, label=label)
        for b, v in zip(bars, mean, strict=True):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                        rotation=90, color="black")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"mean ± sd over folds ({level})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return write_figure(fig, path, dpi=120)


def write_report(run, config, split, cohort_csv, model: Path | None = None) -> dict[str, Path]:
    """report.md, report.json and figures/ in the run's folder; returns the written files."""
    from .plots import write_evaluation_pngs

    out = Path(run.out_dir)
    figs = out / "figures"
    files: dict[str, Path] = {}
    for name, res in run.results.items():
        for key, p in write_evaluation_pngs(res, figs).items():
            files[f"{name}.{key}"] = p
    files["summary_png"] = summary_png(run, figs / "summary.png")
    calibration = getattr(run, "calibration", {}) or {}
    if calibration:
        from .plots import reliability_png

        files["reliability_png"] = reliability_png(calibration, figs / "reliability.png")

    level_note = ("per patient (the scans of a patient combined first)" if run.n_scans != run.n_patients
                  else "per patient (one scan each)")
    md = [f"# Evaluation: {Path(cohort_csv).name}", ""]
    md.append(f"Cohort `{cohort_csv}`: {run.n_patients} patients, {run.n_scans} scans. Reference labels: "
              f"{'the cohort table' if config.reference == 'labels' else 'the true labels of the phantom'}. "
              f"Rule set: {config.rules}.")
    if model is not None:
        md.append(f"Model `{model}` tested on every scan (no training).")
    if split is not None:
        strata = ", ".join(f"{k} {v}" for k, v in split.stratum_counts().items())
        md.append(f"Patient-level stratified {split.n_folds}-fold split (seed {split.seed}, validation share "
                  f"{split.val_fraction:g} of the non-test patients; file `split.json`). Strata: {strata}.")
        trained = [n for n in run.methods if n.startswith(("ts", "fusion"))]
        if trained:
            t = config.training_dict()
            md.append(f"Training: {'small network (32^3 patches at 2 mm)' if config.small else 'reference network'}"
                      f", {t['epochs']} epochs (TS2/TS3 {t['ts23_epochs'] or t['epochs']}), "
                      f"{t['max_steps_per_epoch'] or 'all'} steps per epoch, batch {t['batch_size'] or 'default'}, "
                      f"lr {t['lr']}, seed {t['seed']}; best epoch by validation balanced accuracy.")
        if any(n.startswith(("nodes-mil", "fusion")) for n in run.methods):
            md.append(f"Node classifier: {config.node_epochs} epochs, 32 mm patches at {config.node_patch_spacing:g} "
                      f"mm, malignant bags weighted x{config.node_pos_weight:g}; best epoch by validation station "
                      "AUC; nodes detected with the node model in the fused station map.")
        if "ct" in getattr(config, "modalities", ()):
            md.append("Methods ending in `-ct` are trained and tested on the CT alone (no PET channel, no SUV "
                      "features); `short-axis` reads only the CT.")
    md += ["", f"## Results {level_note}: mean ± sd over folds", "", markdown_table(list(run.results.values()),
                                                                                      "patient")]
    md += ["LNS = lymph node station level (stations of the test patients pooled); N = N-stage level. "
           "Sens/Spec at N-stage level are the macro one-vs-rest values; N err>=2 is the rate of errors of two or "
           "more stages; N+ AUC is the ROC AUC of N+ against N0 from the patient's score (1 - P(N0) with a staging "
           "head, else the highest station score). Stations absent from a scan's station map count as negative "
           "for every method.", ""]
    points = getattr(run, "station_points", {}) or {}
    if points:
        md += ["## Station decisions at the station-tuned threshold", "",
               "| method | LNS BalAcc (pooled) | mean ± sd over folds | threshold per fold |", "|---|---|---|---|"]
        for m, d in points.items():
            f = d["folds"]
            sd = "n/a" if f.get("sd") is None else f"{f['sd']:.2f}"
            md.append(f"| {m} | {_fmt(d['balanced_accuracy'])} | {_fmt(f.get('mean'))} ± {sd} | "
                      + ", ".join(f"{t:.2f}" for t in d["thresholds"]) + " |")
        md += ["", "The tables above use each method's operating threshold: for the learned methods the one tuned on "
               "the validation patients for the N-stage (the rules applied to the station decisions). Here every "
               "method's stations are decided at the threshold tuned on the validation patients for the station "
               "balanced accuracy instead (the SUVmax threshold: on the training and validation patients; the "
               "node rules: their fixed cut-offs).", ""]
    node_level = getattr(run, "node_level", {}) or {}
    if node_level:
        md += ["## Node level: detected nodes against the node truth", "",
               "| method | node AUC (pooled) | mean ± sd over folds | malignant | benign |", "|---|---|---|---|---|"]
        for m, d in node_level.items():
            f = d["folds"]
            sd = "n/a" if f.get("sd") is None else f"{f['sd']:.2f}"
            md.append(f"| {m} | {_fmt(d['auc'])} | {_fmt(f.get('mean'))} ± {sd} | {d['malignant_nodes']} | "
                      f"{d['benign_nodes']} |")
        md += ["", "Each detected node is malignant when the truth node it overlaps most is malignant (a detection "
               "overlapping no truth node is benign). Node classifiers and the fusion score each node; station "
               "methods give a node its station's score; the rules their own measurement.", ""]
    if run.n_scans != run.n_patients:
        md += ["## Results per scan: mean ± sd over folds", "", markdown_table(list(run.results.values()), "scan")]
    md += ["## All folds pooled, with 95 % bootstrap confidence intervals (patients resampled)", "",
           _ci_table(run, "patient")]
    if run.comparisons:
        md += ["## Paired tests on the same test patients", "",
               "Stations: McNemar on the station decisions (exact binomial when the discordant pairs are few) and a "
               "paired bootstrap of the station AUC difference (patients resampled). "
               "N-stage: paired permutation test of the accuracy difference (the two methods' predictions of a "
               "patient swapped at random).", "", _tests_table(run)]
    if calibration:
        md += ["## Calibration of the station probabilities (all test folds pooled)", "",
               "| method | stations | ECE | Brier |", "|---|---|---|---|"]
        md += [f"| {m} | {c['n']} | {_fmt(c['ece'], 3)} | {_fmt(c['brier'], 3)} |" for m, c in calibration.items()]
        md += ["", "ECE: expected calibration error over 10 equal-width bins of predicted probability, weighted by "
               "the share of stations in a bin; Brier: mean squared error of the probability. Probabilities are the "
               "calibrated ones of each checkpoint (fitted on its validation patients). The SUVmax and lesion "
               "baselines give scores, not probabilities, and have no row. "
               "![Reliability](figures/reliability.png)", ""]
    cut = _cutoffs(run)
    if cut:
        md += ["## Cut-offs of each fold", "", "SUVmax and lesion overlap: chosen on the training and validation "
               "patients; probabilities: tuned on the validation patients.", "", cut]
    md += ["## Figures", "", "![Summary](figures/summary.png)", ""]
    for name in run.results:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        md.append(f"![{name} N-stage](figures/{safe}_patient_nstage_confusion.png)")
    md += ["", f"Run time: {run.seconds / 60:.1f} min.", ""]
    files["report"] = write_text(out / "report.md", "\n".join(md))
    files["json"] = write_json(out / "report.json", {
        **run.to_dict(), "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "results": {n: r.to_dict() for n, r in run.results.items()},
        "folds": {n: [fp.params for fp in preds] for n, preds in run.predictions.items()},
    })
    return files
