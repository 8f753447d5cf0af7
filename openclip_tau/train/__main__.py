"""``python -m openclip_tau.train``."""

from openclip_tau.train.command import cli

if __name__ == "__main__":
    cli()
