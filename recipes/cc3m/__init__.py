"""CC3M image-text recipe: download, train with each loss, evaluate, analyse the temperatures.

The steps are separate commands (see ``recipes/README.md``); this package holds what they share:
the recipe's OpenCLIP model configs and the helpers to find img2dataset shards.
"""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: The recipe's model configs (file stems in ``model_configs/``), registered by
#: :func:`register_model_configs`. ViT-B-32 is built into open_clip.
RECIPE_MODELS = ("RN50-distilbert-size", "cc3m-smoke-tiny")


def register_model_configs() -> list[str]:
    """Adds ``model_configs/`` to open_clip's registry; returns the recipe's model names.

    open_clip reads model configs from its own package folder only, so every process that
    builds one of the recipe's models (training, evaluation) calls this first. Safe to call
    more than once.
    """
    import open_clip  # imported here: the TSV and data steps must not pay for it

    if not any(name in open_clip.list_models() for name in RECIPE_MODELS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    missing = [name for name in RECIPE_MODELS if name not in open_clip.list_models()]
    if missing:
        raise RuntimeError(f"model configs {missing} not found in {MODEL_CONFIG_DIR}")
    return list(RECIPE_MODELS)
