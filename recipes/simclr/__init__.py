"""Lightly's SimCLR example with the loss chosen by a flag: pure PyTorch and Lightning."""
