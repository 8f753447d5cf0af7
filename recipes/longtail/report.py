"""The report folder: results tables (CSV, JSON), PNG plots and a Markdown page.

Every number written here comes from the runs' :class:`RunResult` objects; nothing is typed in.
The tables are pandas frames (``groupby().agg`` for the mean and spread over seeds, ``to_csv``,
``to_markdown``); the page is the jinja2 template ``templates/report.md.j2`` fed with them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
import pandas as pd

from recipes.longtail import claim
from recipes.longtail.claim import ClaimRun
from recipes.longtail.data import GROUP_NAMES, LongTailData
from recipes.longtail.plots import (
    ACCURACY_KINDS,
    GROUPS,
    loss_colors,
    plot_accuracy,
    plot_temperature_by_class,
    plot_temperature_histogram,
    plot_training_curves,
)
from recipes.longtail.train import (
    LOSS_LABELS,
    LOSS_REGISTRY,
    LossSettings,
    RunResult,
)
from recipes.temperature_analysis import (
    QUANTILE_COLUMNS,
    extremes,
    plot_extremes_grid,
    quantiles,
)

PLOTS = {
    "accuracy": "accuracy_by_group.png",
    "curves": "training_curves.png",
    "tau_class": "temperature_by_class.png",
    "tau_hist": "temperature_histogram.png",
    "tau_extremes": "temperature_extremes.png",
    "claim": "claim_spearman.png",
    "density": "temperature_vs_density.png",
}
# Training images shown and listed at each end of the learned temperatures.
EXTREMES_K = 8
SIGNIFICANCE = 0.05
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("recipes.longtail", "templates"),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)


# --------------------------------------------------------------------------- rows and tables
def run_row(result: RunResult) -> dict[str, Any]:
    """One flat row of measurements per run (the CSV table)."""
    row: dict[str, Any] = {"loss": result.loss, "label": LOSS_LABELS[result.loss]}
    row["seed"] = result.seed
    row["epochs"] = len(result.history)
    for kind in ACCURACY_KINDS:
        for group in GROUPS:
            row[f"{kind}_{group}"] = result.evaluation[kind][group]
    last = result.history[-1] if result.history else {}
    row["final_loss"] = last.get("loss_mean", math.nan)
    row["tau_bound_low"], row["tau_bound_high"] = result.temperature_bounds
    tau = result.temperatures
    if tau is not None:
        row.update(tau_mean=tau["mean"], tau_min=tau["min"], tau_max=tau["max"])
        row.update({f"tau_{group}": tau["per_group"][group] for group in GROUP_NAMES})
        row.update(spearman_final=tau["spearman"], p_value_final=tau["p_value"])
        best = max(
            (h for h in result.history if not math.isnan(h.get("spearman", math.nan))),
            key=lambda h: h["spearman"],
            default={"spearman": math.nan, "epoch": math.nan},
        )
        row.update(spearman_max=best["spearman"], spearman_max_epoch=best["epoch"])
    else:
        row["tau_mean"] = last.get("tau_mean", math.nan)
        row["tau_min"] = min((h["tau_low"] for h in result.history), default=math.nan)
        row["tau_max"] = max((h["tau_high"] for h in result.history), default=math.nan)
        row.update({f"tau_{group}": math.nan for group in GROUP_NAMES})
        row.update(dict.fromkeys(("spearman_final", "p_value_final"), math.nan))
        row.update(dict.fromkeys(("spearman_max", "spearman_max_epoch"), math.nan))
    row["train_seconds"] = result.train_seconds
    row["eval_seconds"] = result.eval_seconds
    return row


SUMMARY_FIELDS = [f"{k}_{g}" for k in ACCURACY_KINDS for g in GROUPS] + [
    "tau_mean",
    "tau_min",
    "tau_max",
    "spearman_final",
    "p_value_final",
    "spearman_max",
    "train_seconds",
]


def summary_rows(rows: list[dict[str, Any]], losses: Sequence[str]) -> list[dict[str, Any]]:
    """One row per loss: mean and sample standard deviation over seeds of each measurement
    (NaN skipped; the deviation is NaN for one seed), and the lowest and highest temperature."""
    frame = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["loss"])
    frame = frame[frame["loss"].isin(losses)]
    if frame.empty:
        return []
    grouped = frame.groupby("loss", sort=False)
    stats = grouped[SUMMARY_FIELDS].agg(["mean", "std"]).astype(float)
    stats.columns = [f"{name}_{stat}" for name, stat in stats.columns]
    table = pd.DataFrame(
        {
            "label": grouped["label"].first(),
            "seeds": grouped.size(),
            "seed_list": grouped["seed"].agg(lambda s: " ".join(map(str, s))),
        }
    )
    table = table.join(stats).assign(
        tau_min=grouped["tau_min"].min(), tau_max=grouped["tau_max"].max()
    )
    table = table.reindex([loss for loss in losses if loss in table.index])
    return table.reset_index().to_dict(orient="records")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row, the columns in the order the rows name them (NaN written ``nan``)."""
    pd.DataFrame(list(rows), dtype=object).to_csv(
        path, index=False, na_rep="nan", lineterminator="\r\n"
    )


def _json_ready(value: Any) -> Any:
    """NaN and infinities as None, so the JSON file is standard JSON."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# --------------------------------------------------------------------------- plots
def temperature_extremes(
    tau: Sequence[float], data: LongTailData, k: int = EXTREMES_K
) -> pd.DataFrame:
    """The ``k`` training images with the highest and the ``k`` with the lowest temperature.

    ``tau`` holds one temperature per image of ``data.train``, in its order. Rows: highest
    (largest first), then lowest (smallest first); columns ``end``, ``rank``, ``index`` (into
    ``data.train``), ``class``, ``class_name``, ``class_count`` (training images of the class),
    ``group`` and ``tau``.
    """
    targets = data.train.targets.tolist()
    if len(tau) != len(targets):
        raise ValueError(
            f"{len(tau)} temperatures for {len(targets)} training images: they must be the "
            "run's per-sample temperatures in training-set order."
        )
    frame = pd.DataFrame(
        {
            "index": range(len(targets)),
            "class": targets,
            "class_name": [data.classes[c] for c in targets],
            "class_count": [data.class_counts[c] for c in targets],
            "group": [data.class_group[c] for c in targets],
            "tau": [float(t) for t in tau],
        }
    )
    return extremes(frame, "tau", k)


def write_temperature_extremes(
    path: Path, tau: Sequence[float], data: LongTailData, seed: int, k: int = EXTREMES_K
) -> pd.DataFrame:
    """Writes the image grid of :func:`temperature_extremes` (highest temperatures on the top
    row, lowest on the bottom, each titled with class and tau) to ``path``; returns the table."""
    table = temperature_extremes(tau, data, k)
    title = (
        f"iSogCLR: training images with the highest and lowest learned temperature (seed {seed})"
    )
    plot_extremes_grid(path, table, data.train.images, "class_name", title, full_range=True)
    return table


def temperature_quantiles_by_group(
    results: Sequence[RunResult], data: LongTailData
) -> list[dict[str, Any]]:
    """Per run and class group: samples and quantiles of the per-sample temperatures."""
    groups = [data.class_group[c] for c in data.train.targets.tolist()]
    rows = []
    for result in results:
        frame = pd.DataFrame({"group": groups[: len(result.sample_temperatures or [])]})
        frame["tau"] = result.sample_temperatures or []
        for group in GROUP_NAMES:
            values = frame.loc[frame["group"] == group, "tau"].tolist()
            rows.append(
                {"seed": result.seed, "group": group, "samples": len(values), **quantiles(values)}
            )
    return rows


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(row: dict[str, Any], name: str, digits: int = 3) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if math.isnan(std):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (``DataFrame.to_markdown``) of cells taken as the text they are."""
    frame = pd.DataFrame([list(map(str, row)) for row in rows], columns=list(header))
    return frame.to_markdown(index=False, disable_numparse=True)


RESULTS_HEADER = (
    ["loss", "temperature"]
    + [f"{name} {group}" for name in ("kNN", "probe") for group in ("all", "head", "mid", "tail")]
    + ["tau", "Spearman", "p"]
)
RUNS_COLUMNS = {
    "loss": ("label", None),
    "seed": ("seed", None),
    "kNN all": ("knn_all", 3),
    "kNN tail": ("knn_tail", 3),
    "probe all": ("probe_all", 3),
    "probe tail": ("probe_tail", 3),
    "tau": ("tau_mean", 3),
    "Spearman": ("spearman_final", 2),
    "train s": ("train_seconds", 0),
}


def result_tables(
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    baseline: Optional[dict],
    results: list[RunResult],
    data: LongTailData,
) -> dict[str, str]:
    """The page's tables of the comparison: results per loss, per run, per class, per epoch."""
    table = [
        [r["label"], LOSS_REGISTRY[r["loss"]].temperature_kind]
        + [_pm(r, f"{k}_{g}") for k in ACCURACY_KINDS for g in GROUPS]
        + [_pm(r, "tau_mean"), _pm(r, "spearman_final", 2), _pm(r, "p_value_final")]
        for r in summary
    ]
    if baseline:
        table.append(
            ["raw pixels (reference)", "–"]
            + [_fmt(baseline[k][g]) for k in ACCURACY_KINDS for g in GROUPS]
            + ["–", "–", "–"]
        )
    tables = {"results": markdown_table(RESULTS_HEADER, table), "runs": "", "class_tau": ""}
    if len({r["seed"] for r in rows}) > 1:
        cells = [
            [_fmt(r[key], d) if d is not None else r[key] for key, d in RUNS_COLUMNS.values()]
            for r in rows
        ]
        tables["runs"] = markdown_table(list(RUNS_COLUMNS), cells)
    iso = [r for r in results if r.loss == "isogclr" and r.temperatures]
    if iso:
        order = sorted(range(data.num_classes), key=lambda c: data.class_rank[c])
        tables["class_tau"] = markdown_table(
            ["class", "images", "group"] + [f"tau, seed {r.seed}" for r in iso],
            [
                [data.classes[c], data.class_counts[c], data.class_group[c]]
                + [_fmt(r.temperatures["per_class"][c]["mean"]) for r in iso]
                for c in order
            ],
        )
        cells = []
        for i, h in enumerate(iso[0].history):
            hs = [r.history[i] if i < len(r.history) else {} for r in iso]
            cells.append(
                [h["epoch"]]
                + [f"{_fmt(h.get('spearman'), 2)} ({_fmt(h.get('p_value'), 3)})" for h in hs]
            )
        tables["epoch_rho"] = markdown_table(
            ["epoch"] + [f"seed {r.seed}: rho (p)" for r in iso], cells
        )
    return tables


def sample_tables(
    tau_extremes: Optional[pd.DataFrame], tau_quantiles: Optional[list[dict[str, Any]]]
) -> dict[str, str]:
    """Per-group temperature quantiles, and the images at either end of tau, as Markdown."""
    tables = {"quantiles": "", "extremes": ""}
    if tau_quantiles:
        tables["quantiles"] = markdown_table(
            ["seed", "group", "images"] + QUANTILE_COLUMNS,
            [
                [q["seed"], q["group"], q["samples"]]
                + [_fmt(q.get(name)) for name in QUANTILE_COLUMNS]
                for q in tau_quantiles
            ],
        )
    if tau_extremes is not None and len(tau_extremes):
        cells = tau_extremes[["end", "rank", "index", "class_name", "class_count", "group"]]
        cells = cells.astype(str).assign(tau=[_fmt(float(t), 4) for t in tau_extremes["tau"]])
        cells.columns = ["end", "rank", "index", "class", "class size", "group", "tau"]
        tables["extremes"] = cells.to_markdown(index=False, disable_numparse=True)
    return tables


def settings_table(config: dict) -> str:
    """Backbone, optimiser, budget, precision, augmentation, each loss, kNN and probe."""
    t = config["train"]
    rows = [
        [
            "backbone",
            f"{t['backbone']} + Lightly SimCLRProjectionHead ({t['hidden_dim']}-{t['output_dim']})",
        ],
        [
            "optimiser",
            f"{t['optimizer']}, lr {t['lr']:g}, weight decay {t['weight_decay']:g}, "
            f"warmup {t['warmup_epochs']} epochs, cosine decay per step",
        ],
        ["epochs, batch size", f"{t['epochs']}, {t['batch_size']}"],
        [
            "precision",
            "bf16 autocast for the model, float32 for the losses"
            if t["precision"] == "bf16"
            else "float32",
        ],
        ["augmentation", f"{t['augment']}: {config['augment']}"],
    ]
    loss_settings = LossSettings(**config["loss"])
    rows += [
        [LOSS_LABELS[name], LOSS_REGISTRY[name].describe(loss_settings)]
        for name in config["losses"]
    ]
    rows += [
        [
            "kNN",
            f"k {t['knn_k']}, weights exp(similarity / {t['knn_t']:g}), L2-normalised backbone features",
        ],
        [
            "linear probe",
            f"logistic regression (L-BFGS, at most {t['probe_epochs']} iterations) on frozen, standardised features",
        ],
    ]
    return markdown_table(["setting", "value"], rows)


def data_table(data: LongTailData) -> str:
    """Rank, class, training and test images and group of each class, most frequent first."""
    test_counts = data.test.targets.bincount(minlength=data.num_classes).tolist()
    rows = [
        [
            data.class_rank[c],
            data.classes[c],
            data.class_counts[c],
            data.class_group[c],
            test_counts[c],
        ]
        for c in sorted(range(data.num_classes), key=lambda c: data.class_rank[c])
    ]
    return markdown_table(["rank", "class", "train images", "group", "test images"], rows)


def findings(
    summary: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    baseline: Optional[dict],
    claim_tested: bool = False,
) -> list[str]:
    """Plain statements of what this run's numbers can and cannot support.

    With ``claim_tested`` the iSogCLR correlation of the comparison's own runs is left to the
    claim's verdict over seeds and class orders, which includes them.
    """
    notes = []
    seeds = sorted({r["seed"] for r in rows})
    for kind, title in (("knn", "kNN"), ("probe", "Linear-probe")):
        means = [(r[f"{kind}_all_mean"], r["label"]) for r in summary]
        if len(means) > 1:
            best, worst = max(means), min(means)
            gap = best[0] - worst[0]
            stds = [r[f"{kind}_all_std"] for r in summary if not math.isnan(r[f"{kind}_all_std"])]
            if stds:
                spread = float(pd.Series(stds).mean())
                verdict = "more than" if gap > 2 * spread else "at most"
                notes.append(
                    f"{title} accuracy over all classes: the losses span {100 * gap:.1f} points "
                    f"({worst[1]} {100 * worst[0]:.1f}% to {best[1]} {100 * best[0]:.1f}%); the "
                    f"seed-to-seed standard deviation over {len(seeds)} seeds averages "
                    f"{100 * spread:.1f} points, and the span is {verdict} twice that (a rough "
                    "screen, not a significance test)."
                )
            else:
                notes.append(
                    f"{title} accuracy over all classes: the losses span {100 * gap:.1f} points "
                    f"({worst[1]} {100 * worst[0]:.1f}% to {best[1]} {100 * best[0]:.1f}%) with "
                    "one seed, so the seed-to-seed spread is unknown and no ranking of the losses "
                    "follows from this run; use `--seeds 0 1 2`."
                )
    if baseline and summary:
        for kind, name in (("knn", "kNN"), ("probe", "linear-probe")):
            best = max(r[f"{kind}_all_mean"] for r in summary)
            worst = min(r[f"{kind}_all_mean"] for r in summary)
            raw = baseline[kind]["all"]
            if best < raw:
                verdict = (
                    f"every loss's {name} accuracy (at most {100 * best:.1f}%) is below the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%): by this measure the "
                    "representations are not yet better than the pixels."
                )
            elif worst > raw:
                verdict = (
                    f"every loss's {name} accuracy (at least {100 * worst:.1f}%) is above the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%)."
                )
            else:
                verdict = (
                    f"{name} accuracies ({100 * worst:.1f}% to {100 * best:.1f}%) straddle the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%)."
                )
            notes.append(verdict[0].upper() + verdict[1:])
    iso = next((r for r in summary if r["loss"] == "isogclr"), None)
    if iso is not None and not claim_tested:
        iso_rows = [r for r in rows if r["loss"] == "isogclr"]
        parts = []
        for r in iso_rows:
            if math.isnan(r["spearman_final"]):
                parts.append(f"seed {r['seed']}: undefined (every class has the same frequency)")
                continue
            sig = "significant" if r["p_value_final"] < SIGNIFICANCE else "not significant"
            parts.append(
                f"seed {r['seed']}: {r['spearman_final']:+.2f} (permutation p {r['p_value_final']:.3f}, "
                f"{sig} at {SIGNIFICANCE}; highest over epochs {r['spearman_max']:+.2f} at epoch "
                f"{int(r['spearman_max_epoch'])})"
            )
        notes.append(
            "iSogCLR's learned temperature against class frequency (Spearman over classes, after "
            "the last epoch): " + "; ".join(parts) + ". A positive value is the paper's claim: "
            "frequent classes get larger temperatures, rare ones smaller."
        )
        means = pd.DataFrame(iso_rows)[[f"tau_{g}" for g in GROUP_NAMES]].mean()
        notes.append(
            "Class mean temperatures by group (last epoch, mean over seeds): "
            + ", ".join(f"{g} {_fmt(float(means[f'tau_{g}']))}" for g in GROUP_NAMES)
            + "; compare with the spread within a class (p10-p90 bars in the temperature plot)."
        )
    return notes


def markdown(
    config: dict,
    data: LongTailData,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    baseline: Optional[dict],
    results: list[RunResult],
    plots: dict[str, str],
    timing: dict,
    tau_extremes: Optional[pd.DataFrame] = None,
    tau_quantiles: Optional[list[dict[str, Any]]] = None,
    claim_context: Optional[dict[str, Any]] = None,
    claim_findings: Sequence[str] = (),
) -> str:
    """The report page: ``templates/report.md.j2`` rendered with this run's tables.

    ``tau_extremes`` (:func:`temperature_extremes` of the first iSogCLR run) and
    ``tau_quantiles`` (:func:`temperature_quantiles_by_group`) add their tables to the
    temperature section when given; ``claim_context`` (:func:`recipes.longtail.claim.claim_tables`)
    fills the section on the temperature-frequency claim over seeds and class orders, and
    ``claim_findings`` its verdicts, listed first among the findings.
    """
    iso = [r for r in results if r.loss == "isogclr" and r.temperatures]
    seeds = sorted({r["seed"] for r in rows})
    tables = result_tables(rows, summary, baseline, results, data)
    tables.update(sample_tables(tau_extremes, tau_quantiles), data=data_table(data))
    tables["settings"] = settings_table(config)
    return TEMPLATES.get_template("report.md.j2").render(
        config=config,
        env=config["environment"],
        t=config["train"],
        data=data,
        losses=[r["label"] for r in summary],
        seeds=seeds,
        timing=timing,
        plots=plots,
        tables=tables,
        claim_findings=claim_findings,
        findings=findings(summary, rows, baseline, bool(claim_findings)),
        claim=claim_context,
        extremes_k=int(tau_extremes["rank"].max()) if tables["extremes"] else 0,
        extremes_seed=next((r.seed for r in iso if r.sample_temperatures), iso[0].seed)
        if iso
        else None,
    )


def _write_claim(
    output: Path, paths: dict[str, Path], claim_runs: Sequence[ClaimRun]
) -> tuple[dict[str, Any], Optional[dict[str, Any]], list[str]]:
    """The temperature-frequency claim's table, plots and per-sample CSV (their paths added to
    ``paths``); returns its part of ``results.json``, its report context and its findings."""
    if not claim_runs:
        return {}, None, []
    verdict = claim.claim_verdict(claim_runs)
    analyses = [claim.density_analysis(r) for r in claim_runs if r.tau is not None]
    table_rows = claim.claim_rows(claim_runs, analyses)
    paths["claim_csv"] = output / "claim.csv"
    write_csv(paths["claim_csv"], table_rows)
    paths["claim_plot"] = output / PLOTS["claim"]
    claim.plot_claim_curves(paths["claim_plot"], claim_runs)
    if analyses:
        paths["per_sample_csv"] = output / "per_sample.csv"
        claim.write_per_sample_csv(paths["per_sample_csv"], claim_runs)
        paths["density_plot"] = output / PLOTS["density"]
        # One run per class order in the plot (the first seed of each).
        shown: dict = {}
        for run in claim_runs:
            shown.setdefault((run.class_order, run.data_seed), run)
        claim.plot_density(paths["density_plot"], list(shown.values()))
    claim_context = claim.claim_tables(claim_runs, verdict, analyses)
    claim_findings = [verdict["text"]] + ([claim.density_verdict(analyses)] if analyses else [])
    claim_document = {"verdict": verdict, "runs": table_rows, "density": analyses}
    return claim_document, claim_context, claim_findings


def _write_temperatures(
    output: Path, paths: dict[str, Path], iso: list[RunResult], data: LongTailData
) -> tuple[Optional[pd.DataFrame], list[dict[str, Any]]]:
    """The iSogCLR temperature plots (their paths added to ``paths``); returns the extremes
    table and the quantiles by class group."""
    tau_extremes: Optional[pd.DataFrame] = None
    tau_quantiles: list[dict[str, Any]] = []
    if not iso:
        return tau_extremes, tau_quantiles
    paths["temperature_class_plot"] = output / PLOTS["tau_class"]
    paths["temperature_histogram_plot"] = output / PLOTS["tau_hist"]
    plot_temperature_by_class(paths["temperature_class_plot"], iso, data)
    plot_temperature_histogram(paths["temperature_histogram_plot"], iso[0], data)
    with_samples = [r for r in iso if r.sample_temperatures]
    tau_quantiles = temperature_quantiles_by_group(with_samples, data)
    if with_samples:
        paths["temperature_extremes_plot"] = output / PLOTS["tau_extremes"]
        tau_extremes = write_temperature_extremes(
            paths["temperature_extremes_plot"],
            with_samples[0].sample_temperatures,
            data,
            with_samples[0].seed,
        )
    return tau_extremes, tau_quantiles


def write_report(
    output: Path,
    config: dict,
    data: LongTailData,
    results: list[RunResult],
    baseline: Optional[dict],
    timing: dict,
    claim_runs: Sequence[ClaimRun] = (),
) -> dict[str, Path]:
    """Writes every report file into ``output`` and returns their paths by kind.

    ``results`` are the comparison's runs (on ``data``); ``claim_runs`` the iSogCLR runs of the
    temperature-frequency claim over seeds and class orders (:mod:`recipes.longtail.claim`),
    which add ``claim.csv``, ``per_sample.csv``, two plots and a report section.
    """
    output.mkdir(parents=True, exist_ok=True)
    losses = [loss for loss in config["losses"] if any(r.loss == loss for r in results)]
    rows = [run_row(r) for r in results]
    summary = summary_rows(rows, losses)
    colors = loss_colors(config["losses"])
    paths = {
        "results_csv": output / "results.csv",
        "summary_csv": output / "summary.csv",
        "results_json": output / "results.json",
        "report": output / "report.md",
        "accuracy_plot": output / PLOTS["accuracy"],
        "curves_plot": output / PLOTS["curves"],
    }
    write_csv(paths["results_csv"], rows)
    write_csv(paths["summary_csv"], summary)
    plot_accuracy(paths["accuracy_plot"], summary, baseline, colors)
    plot_training_curves(paths["curves_plot"], results, losses, colors)
    iso = [r for r in results if r.loss == "isogclr" and r.temperatures]
    # Plots of an earlier run in the same folder must not pass for this run's.
    for name in ("tau_class", "tau_hist", "tau_extremes", "claim", "density"):
        (output / PLOTS[name]).unlink(missing_ok=True)
    for name in ("claim.csv", "per_sample.csv"):
        (output / name).unlink(missing_ok=True)
    claim_document, claim_context, claim_findings = _write_claim(output, paths, claim_runs)
    tau_extremes, tau_quantiles = _write_temperatures(output, paths, iso, data)
    document = {
        "config": config,
        "data": data.summary(),
        "baseline_raw_pixels": baseline,
        "runs": [
            {
                k: v
                for k, v in r.to_dict().items()
                if k not in ("sample_temperatures", "sample_density")
            }
            for r in results
        ],
        "rows": rows,
        "summary": summary,
        "temperature_quantiles_by_group": tau_quantiles,
        "temperature_extremes": (
            tau_extremes.to_dict(orient="records") if tau_extremes is not None else []
        ),
        "claim": claim_document,
        "timing": timing,
    }
    with open(paths["results_json"], "w") as handle:
        json.dump(_json_ready(document), handle, indent=1)
    paths["report"].write_text(
        markdown(
            config,
            data,
            rows,
            summary,
            baseline,
            results,
            PLOTS,
            timing,
            tau_extremes,
            tau_quantiles,
            claim_context,
            claim_findings,
        )
    )
    return paths


def summary_table(summary: list[dict[str, Any]], baseline: Optional[dict]) -> str:
    """A fixed-width table of the main numbers (accuracies in %), for the terminal."""

    def pct(value: float) -> str:
        return "–" if math.isnan(value) else f"{100 * value:.1f}"

    cells = [
        [r["label"], pct(r["knn_all_mean"]), pct(r["knn_tail_mean"]), pct(r["probe_all_mean"])]
        + [pct(r["probe_tail_mean"]), _fmt(r["tau_mean_mean"])]
        + ["–" if math.isnan(r["spearman_final_mean"]) else f"{r['spearman_final_mean']:+.2f}"]
        for r in summary
    ]
    if baseline:
        cells.append(
            ["raw pixels (reference)"]
            + [pct(baseline[k][g]) for k in ACCURACY_KINDS for g in ("all", "tail")]
            + ["–", "–"]
        )
    header = ["loss", "kNN", "kNN tail", "probe", "probe tail", "tau", "Spearman"]
    frame = pd.DataFrame(cells, columns=header)
    return frame.to_markdown(
        index=False, tablefmt="simple", disable_numparse=True, colalign=["left"] + ["right"] * 6
    )
