"""Step 4: plots and tables of the per-sample temperatures an iSogCLR run learned.

Reads a checkpoint's ``loss_state_dict`` (written by ``openclip_tau.train --loss isogclr``), the
key index (index k -> sample key) and the shards' captions, and writes to ``--output``:

- ``tau_distribution.png``: histograms of the image and the text temperatures;
- ``tau_vs_word_frequency.png``: each temperature against how frequent its caption's words are
  in the dataset (the rarest word's frequency), with the median per frequency bin;
- ``tau_image_vs_text.png``: the two temperatures of each pair against each other;
- ``extremes.md`` / ``extremes.csv``: the captions with the highest and lowest temperatures;
- ``correlations.csv``: Spearman correlations of each temperature with the frequency measures,
  with a two-sided permutation p-value (``--permutations`` re-pairings, so p is at least
  1 / (permutations + 1));
- ``temperatures.parquet``: one row per sample (index, key, caption, temperatures, frequencies);
- ``summary.json`` and ``summary.md``: counts, quantiles and the correlations;
- with ``--held-out-embeddings`` (a TempNet run): ``tau_train_vs_held_out.png``, the temperatures
  TempNet's networks give held-out image and caption embeddings beside the training pairs'
  (their temperature at their last visit), and their quantiles in the summary.

A word's frequency is the number of captions in the dataset that contain it (lower-cased
alphanumeric words). Per caption: ``rarest_word_frequency`` (its least frequent word),
``mean_log10_word_frequency`` (the mean of log10 frequencies of its words), and
``caption_frequency`` (how many samples share the exact caption). iSogCLR's claim is that
frequent semantics end with large temperatures and rare ones with small: a positive correlation.
Samples the run never visited (their moving average is still unset) are left out. Spearman,
quantiles, histogram bins and the extremes come from ``recipes.temperature_analysis``, shared with
the long-tail recipe.

Usage:
    python -m recipes.cc3m.analyze --checkpoint logs/cc3m-isogclr/checkpoints/epoch_30.pt \\
        --key-index /data/cc3m/shards/key_index.txt --output results/cc3m/temperatures
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from recipes.cli_args import RawDescription, function_arguments, function_parser

ROLES = ("image", "text")
# Permutations of each correlation's p-value: one shuffle of n values each, about 80 ms at
# n = 2.8M on one core, so the six correlations of full CC3M take minutes; p >= 1/1001.
PERMUTATIONS = 1000


class AnalysisInputError(ValueError):
    """An input of the analysis is missing or does not fit; the message says which."""


# ----------------------------------------------------------------------------- inputs
def analyze(
    checkpoint: Path,
    key_index: Path,
    output: Path,
    shards: Optional[str] = None,
    top: int = 20,
    permutations: int = PERMUTATIONS,
    held_out_embeddings: Optional[Path] = None,
    tau_range: Optional[tuple[float, float]] = None,
) -> dict[str, Any]:
    """Step 4: plots and tables of the per-sample temperatures an iSogCLR run learned.

    Args:
        checkpoint: checkpoint (epoch_K.pt)
        key_index: key index the run used (--tau-key-index)
        output: folder for plots and tables
        shards: training shards (folder, brace pattern or glob); default: the key index's folder
        top: captions listed at each end
        permutations: permutations of each correlation's p-value (cost grows with it and with
            the number of samples; 0 skips the p-values)
        held_out_embeddings: TempNet runs: torch file {'image': (n, d), 'text': (m, d)} of
            held-out embeddings
        tau_range: TempNet's temperature range of the run, [TAU_MIN, TAU_MAX] (default: the one
            the checkpoint records, else the published [0.005, 0.05])
    """
    # numpy, pandas, scipy and matplotlib load here, so that --help answers without them
    from recipes.cc3m import temperature_tables as report
    from recipes.cc3m.shards import find_shards
    from recipes.temperature_analysis import quantiles

    tables, loss_name = report.load_temperature_tables(checkpoint)
    keys = report.load_keys(key_index)
    try:
        shard_files = find_shards(shards if shards is not None else Path(key_index).parent)
    except FileNotFoundError as err:
        raise AnalysisInputError(f"{err} (pass --shards to name the training shards)") from err
    frame = report.build_frame(tables, keys, shard_files)
    output.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(output / "temperatures.parquet", index=False)
    corr = report.correlations(frame, permutations)
    corr.to_csv(output / "correlations.csv", index=False)
    ext = report.extremes(frame, top)
    ext.to_csv(output / "extremes.csv", index=False)
    report.plot_distribution(frame, output / "tau_distribution.png")
    report.plot_against_frequency(
        frame, output / "tau_vs_word_frequency.png", "rarest_word_frequency", corr
    )
    report.plot_image_vs_text(frame, output / "tau_image_vs_text.png")
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "loss": loss_name,
        "num_samples": len(frame),
        "captions_missing": frame.attrs["captions_missing"],
        "permutations": permutations,
    }
    for role in ROLES:
        visited = frame[f"visited_{role}"]
        summary[f"visited_{role}"] = int(visited.sum())
        summary[f"tau_{role}"] = quantiles(frame.loc[visited, f"tau_{role}"].to_numpy())
    if held_out_embeddings is not None:
        held_out = report.held_out_temperatures(checkpoint, held_out_embeddings, *(tau_range or ()))
        report.plot_train_vs_held_out(frame, held_out, output / "tau_train_vs_held_out.png")
        for role in ROLES:
            summary[f"tau_{role}_held_out"] = quantiles(held_out[role])
    summary["correlations"] = corr.to_dict(orient="records")
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "extremes.md").write_text(report.extremes_markdown(ext))
    (output / "summary.md").write_text(report.summary_markdown(summary, corr))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses the options (generated from :func:`analyze`), runs it, prints the summary."""
    parser = function_parser(
        analyze,
        prog="python -m recipes.cc3m.analyze",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=RawDescription,
    )
    _, options = function_arguments(parser, analyze, argv)
    try:
        summary = analyze(**options)
    except AnalysisInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
