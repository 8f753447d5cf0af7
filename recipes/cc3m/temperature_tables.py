"""The pieces of :func:`recipes.cc3m.analyze.analyze`: the checkpoint's temperature tables and
the samples' keys and captions as one frame, word frequencies, Spearman correlations with
permutation p-values, the extremes, the plots and the summary pages.

Imported once an analysis runs: its libraries (numpy, pandas, scipy, matplotlib) cost seconds.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from recipes import temperature_analysis
from recipes.cc3m.analyze import PERMUTATIONS, ROLES, AnalysisInputError
from recipes.cc3m.shards import read_captions
from recipes.temperature_analysis import (
    QUANTILE_COLUMNS,
    plot_distribution_by_group,
    pyplot,
    save_figure,
)

FREQUENCY_MEASURES = ("rarest_word_frequency", "mean_log10_word_frequency", "caption_frequency")
WORD = re.compile(r"[a-z0-9]+")


def load_temperature_tables(checkpoint: Path) -> tuple[dict[str, np.ndarray], str]:
    """The per-sample tables of an iSogCLR loss state: ``tau_image``, ``log_u_image``, ... .

    ``checkpoint`` is an OpenCLIP checkpoint with ``loss_state_dict`` (and ``loss_name``), or a
    file holding a loss's ``state_dict()`` itself.
    """
    import torch

    if not Path(checkpoint).is_file():
        raise AnalysisInputError(f"checkpoint not found: {checkpoint}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(saved, Mapping):
        raise AnalysisInputError(f"{checkpoint} holds a {type(saved).__name__}, not a checkpoint.")
    if "loss_state_dict" in saved:
        state, loss_name = saved["loss_state_dict"], str(saved.get("loss_name", "unknown"))
    elif "state_dict" in saved:
        raise AnalysisInputError(
            f"{checkpoint} has no loss_state_dict: it was written without a stateful loss "
            f"(loss {saved.get('loss_name', 'clip')!r}). Per-sample temperatures come from "
            "openclip_tau.train --loss isogclr."
        )
    else:
        state, loss_name = saved, "unknown"
    tables = {}
    for key, value in state.items():
        name = key.rsplit(".", 1)[-1]
        if name.startswith(("tau_", "log_u_", "momentum_")) and hasattr(value, "numpy"):
            tables[name] = value.detach().float().cpu().numpy()
    missing = [f"tau_{role}" for role in ROLES if f"tau_{role}" not in tables]
    if missing:
        raise AnalysisInputError(
            f"the loss state in {checkpoint} (loss {loss_name!r}) has no {missing} tables: "
            "only --loss isogclr learns a temperature per image and per caption."
        )
    lengths = {name: len(t) for name, t in tables.items()}
    if len(set(lengths.values())) != 1:
        raise AnalysisInputError(f"the loss state's tables differ in length: {lengths}")
    return tables, loss_name


def load_keys(key_index: Path) -> list[str]:
    """Sample keys in index order, from an ``openclip_tau.key_index`` file."""
    from openclip_tau.key_index import load_key_index

    try:
        return load_key_index(key_index).keys
    except (OSError, ValueError) as err:
        raise AnalysisInputError(str(err)) from err


# ----------------------------------------------------------------------------- frequencies
def caption_words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


def word_frequency_table(captions: Sequence[str]) -> pd.DataFrame:
    """Per caption: rarest word's and mean log10 word frequency, and exact-caption frequency."""
    words = [set(caption_words(c)) for c in captions]
    document_frequency = Counter(w for ws in words for w in ws)
    caption_count = Counter(captions)
    rarest, mean_log = [], []
    for ws in words:
        if ws:
            freq = [document_frequency[w] for w in ws]
            rarest.append(min(freq))
            mean_log.append(float(np.mean(np.log10(freq))))
        else:
            rarest.append(np.nan)
            mean_log.append(np.nan)
    return pd.DataFrame(
        {
            "rarest_word_frequency": rarest,
            "mean_log10_word_frequency": mean_log,
            "caption_frequency": [caption_count[c] for c in captions],
        }
    )


def spearman(
    x: Sequence[float], y: Sequence[float], permutations: int = PERMUTATIONS
) -> tuple[float, float, int]:
    """Spearman's rho, its two-sided permutation p-value and n, NaN pairs dropped.

    rho and p come from :func:`recipes.temperature_analysis.spearman` (average ranks for ties);
    n is the number of pairs they were computed on, for the tables.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(np.sum(~(np.isnan(x) | np.isnan(y))))
    rho, p = temperature_analysis.spearman(x, y, permutations)
    return rho, p, n


def load_temperature_networks(
    checkpoint: Path, tau_min: Optional[float] = None, tau_max: Optional[float] = None
) -> dict[str, Any]:
    """TempNet's image and text networks from a checkpoint's loss state, in eval mode.

    The dimension and the number of prototypes are read from the weights. The temperature range
    is the run's: ``loss_options["class_kwargs"]`` of an ``openclip_tau.train`` checkpoint, else
    ``tau_min``/``tau_max`` as given, else the published 0.005, 0.05.
    """
    import torch

    from tau_core import TemperatureNetwork

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = saved.get("loss_state_dict", saved) if isinstance(saved, Mapping) else {}
    recorded = {}
    if isinstance(saved, Mapping):
        recorded = (saved.get("loss_options") or {}).get("class_kwargs") or {}
    if tau_min is None:
        tau_min = recorded.get("tau_min", 0.005)
    if tau_max is None:
        tau_max = recorded.get("tau_max", 0.05)
    networks = {}
    for role in ROLES:
        prefix = f"temperature_networks.{role}."
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise AnalysisInputError(
                f"the loss state in {checkpoint} has no {role} temperature network: held-out "
                "temperatures need a TempNet checkpoint (--loss tempnet)."
            )
        m, dim = weights["prototypes"].shape
        net = TemperatureNetwork(dim, tau_min, tau_max, num_prototypes=m)
        net.load_state_dict(weights)
        networks[role] = net.eval()
    return networks


def held_out_temperatures(
    checkpoint: Path,
    embeddings: Path,
    tau_min: Optional[float] = None,
    tau_max: Optional[float] = None,
) -> dict[str, np.ndarray]:
    """TempNet's temperature of each held-out image and caption embedding.

    ``embeddings`` is a ``torch.save``d dict ``{"image": (n, d), "text": (m, d)}`` of the trained
    model's embeddings of pairs it was not trained on (e.g. a validation split).
    """
    import torch

    if not Path(embeddings).is_file():
        raise AnalysisInputError(f"held-out embeddings not found: {embeddings}")
    held_out = torch.load(embeddings, map_location="cpu", weights_only=False)
    networks = load_temperature_networks(checkpoint, tau_min, tau_max)
    out = {}
    with torch.no_grad():
        for role in ROLES:
            if role not in held_out:
                raise AnalysisInputError(f"{embeddings} has no {role!r} embeddings.")
            z = torch.nn.functional.normalize(torch.as_tensor(held_out[role]).float(), dim=1)
            out[role] = networks[role](z).numpy()
    return out


def plot_train_vs_held_out(
    frame: pd.DataFrame, held_out: Mapping[str, np.ndarray], path: Path
) -> None:
    """Per role: the training pairs' temperatures beside the held-out ones (unit area each)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, role in zip(axes, ROLES):
        train = frame.loc[frame[f"visited_{role}"], f"tau_{role}"].to_numpy()
        groups = {
            f"training ({len(train)})": train,
            f"held out ({len(held_out[role])})": held_out[role],
        }
        plot_distribution_by_group(
            ax, groups, colors=["tab:blue", "tab:red"], density=True, histtype="step"
        )
        ax.set_title(f"TempNet {role} temperatures")
        ax.set_xlabel(f"tau_{role}")
        ax.set_ylabel("density")
        ax.legend()
    save_figure(fig, path, dpi=120, tight=False)


# ----------------------------------------------------------------------------- analysis
def build_frame(tables: Mapping[str, np.ndarray], keys: Sequence[str], shards: Any) -> pd.DataFrame:
    """One row per index: key, caption, temperatures, visited flags and frequency measures."""
    num_samples = len(next(iter(tables.values())))
    if len(keys) != num_samples:
        raise AnalysisInputError(
            f"the key index has {len(keys)} keys but the loss state has {num_samples} rows: "
            "use the key index the run was trained with (--tau-key-index)."
        )
    captions = read_captions(shards)
    if captions.empty:
        raise AnalysisInputError(f"the shards {shards[0].parent} hold no captions.")
    by_key = dict(zip(captions["key"], captions["caption"]))
    frame = pd.DataFrame({"index": np.arange(num_samples), "key": list(keys)})
    frame["caption"] = [by_key.get(k) for k in frame["key"]]
    missing = int(frame["caption"].isna().sum())
    if missing == num_samples:
        raise AnalysisInputError(
            "none of the key index's keys has a caption in the shards: are the shards the "
            "ones the key index was built from?"
        )
    frame["caption"] = frame["caption"].fillna("")
    for role in ROLES:
        frame[f"tau_{role}"] = tables[f"tau_{role}"]
        log_u = tables.get(f"log_u_{role}")
        frame[f"visited_{role}"] = np.isfinite(log_u) if log_u is not None else True
    # Frequencies over every caption in the dataset, visited or not.
    frequencies = word_frequency_table(list(captions["caption"]))
    frequencies.index = captions["key"].to_numpy()
    frequencies = frequencies[~frequencies.index.duplicated()]
    frame = frame.join(frequencies, on="key")
    frame.attrs["captions_missing"] = missing
    return frame


def correlations(frame: pd.DataFrame, permutations: int = PERMUTATIONS) -> pd.DataFrame:
    """Spearman (rho, permutation p, n) of each visited temperature with each frequency measure."""
    rows = []
    for role in ROLES:
        visited = frame[frame[f"visited_{role}"]]
        for measure in FREQUENCY_MEASURES:
            rho, p, n = spearman(visited[f"tau_{role}"], visited[measure], permutations)
            rows.append(
                {"temperature": f"tau_{role}", "against": measure, "spearman": rho, "p": p, "n": n}
            )
    return pd.DataFrame(rows)


def extremes(frame: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` captions with the highest and the lowest temperature, for each role."""
    columns = ["key", "caption", "rarest_word_frequency"]
    parts = []
    for role in ROLES:
        visited = frame.loc[frame[f"visited_{role}"], [f"tau_{role}"] + columns]
        part = temperature_analysis.extremes(visited, f"tau_{role}", top)
        part = part.rename(columns={f"tau_{role}": "tau"})
        part["tau"] = part["tau"].astype(np.float64)  # both roles in one float64 column
        part.insert(0, "temperature", f"tau_{role}")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- plots
def plot_distribution(frame: pd.DataFrame, path: Path) -> None:
    """Histograms of the visited image and text temperatures, side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, role in zip(axes, ROLES):
        values = frame.loc[frame[f"visited_{role}"], f"tau_{role}"].to_numpy()
        color = "tab:blue" if role == "image" else "tab:orange"
        plot_distribution_by_group(ax, {role: values}, colors=[color])
        ax.set_title(f"{role} temperatures ({len(values)} samples)")
        ax.set_xlabel(f"tau_{role}")
        ax.set_ylabel("samples")
    save_figure(fig, path, dpi=120, tight=False)


def plot_against_frequency(
    frame: pd.DataFrame, path: Path, measure: str, corr: Optional[pd.DataFrame] = None
) -> None:
    """Each visited temperature against ``measure``, with the median per bin and Spearman.

    ``corr`` (from :func:`correlations`) supplies the titles' Spearman values; without it they
    are computed here.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, role in zip(axes, ROLES):
        part = frame[frame[f"visited_{role}"]].dropna(subset=[measure])
        x, y = part[measure].to_numpy(float), part[f"tau_{role}"].to_numpy(float)
        log_x = measure != "mean_log10_word_frequency" and len(x) and x.min() > 0
        if len(x) > 5000:
            ax.hexbin(x, y, xscale="log" if log_x else "linear", bins="log", gridsize=60)
        else:
            ax.scatter(x, y, s=6, alpha=0.4)
            if log_x:
                ax.set_xscale("log")
        if len(x) >= 10:
            edges = (
                temperature_analysis.histogram_bins(x, 12)
                if log_x
                else np.linspace(x.min(), x.max() + 1e-9, 12)
            )
            which = np.clip(np.digitize(x, edges) - 1, 0, len(edges) - 2)
            medians = pd.DataFrame({"x": x, "y": y}).groupby(which).median()
            centers, medians = medians["x"], medians["y"]
            ax.plot(centers, medians, color="black", marker="o", label="median per bin")
            ax.legend(loc="best")
        found = (
            corr[(corr["temperature"] == f"tau_{role}") & (corr["against"] == measure)]
            if corr is not None
            else []
        )
        if len(found):
            rho, p, n = (found.iloc[0][name] for name in ("spearman", "p", "n"))
        else:
            rho, p, n = spearman(y, x)
        ax.set_title(f"tau_{role}: Spearman {rho:+.3f} (p {p:.2g}, n={n})")
        ax.set_xlabel(measure.replace("_", " "))
        ax.set_ylabel(f"tau_{role}")
    save_figure(fig, path, dpi=120, tight=False)


def plot_image_vs_text(frame: pd.DataFrame, path: Path) -> None:
    """The image temperature against the text temperature of each pair visited in both."""
    plt = pyplot()
    both = frame[frame["visited_image"] & frame["visited_text"]]
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    if len(both) > 5000:
        ax.hexbin(both["tau_image"], both["tau_text"], bins="log", gridsize=60)
    else:
        ax.scatter(both["tau_image"], both["tau_text"], s=6, alpha=0.4)
    rho, _, n = spearman(both["tau_image"], both["tau_text"], permutations=0)  # no p shown
    ax.set_title(f"image vs text temperature (Spearman {rho:+.3f}, n={n})")
    ax.set_xlabel("tau_image")
    ax.set_ylabel("tau_text")
    save_figure(fig, path, dpi=120, tight=False)


def _markdown(frame: pd.DataFrame) -> str:
    """A Markdown table, floats to 4 significant digits, one line per cell."""
    cells = frame.map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    cells = cells.map(lambda v: v.replace("|", "/").replace("\n", " "))
    return cells.to_markdown(index=False, disable_numparse=True)


def _p_note(summary: Mapping[str, Any]) -> str:
    permutations = int(summary.get("permutations", PERMUTATIONS))
    if permutations <= 0:
        return "not computed, --permutations 0"
    return (
        f"two-sided permutation test with {permutations} permutations, so never below "
        f"{1 / (permutations + 1):.2g}"
    )


def extremes_markdown(ext: pd.DataFrame) -> str:
    lines = ["# Captions with the highest and lowest learned temperatures", ""]
    columns = {"rank": "rank", "tau": "tau", "rarest_word_frequency": "rarest word freq."}
    for (temperature, end), part in ext.groupby(["temperature", "end"], sort=False):
        part = part[[*columns, "caption"]].rename(columns=columns)
        lines += [f"## {end} {temperature}", "", _markdown(part), ""]
    return "\n".join(lines)


def summary_markdown(summary: Mapping[str, Any], corr: pd.DataFrame) -> str:
    quantiles_table = pd.DataFrame(
        [{"temperature": f"tau_{role}", **summary[f"tau_{role}"]} for role in ROLES]
    ).reindex(columns=["temperature", *QUANTILE_COLUMNS])
    return (
        "\n".join(
            [
                "# Learned temperatures",
                "",
                f"Checkpoint `{summary['checkpoint']}` (loss {summary['loss']}), "
                f"{summary['num_samples']} samples; visited: {summary['visited_image']} images, "
                f"{summary['visited_text']} captions.",
                "",
                _markdown(quantiles_table),
                "",
                f"Spearman correlation with how frequent the caption's words are (p: {_p_note(summary)}):",
                "",
                _markdown(
                    corr[["temperature", "against", "spearman", "p", "n"]].rename(
                        columns={"spearman": "Spearman"}
                    )
                ),
            ]
        )
        + "\n"
    )
