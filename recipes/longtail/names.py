"""The long-tailed recipe's choices, without importing anything heavy (for ``--help``)."""

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder")
CLASS_ORDERS = ("natural", "permuted")
AUGMENTATIONS = ("batched", "lightly")
BACKBONES = ("convnet", "resnet18")
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
# Lightly's losses (recipes.longtail.losses.HOST_LOSSES); lightly_tau's registry adds its own.
HOST_LOSS_NAMES = ("ntxent", "ntxent-cosine", "macl", "dcl")
# The main job's comparison; the others run with --losses (e.g. --losses all).
DEFAULT_LOSSES = ("ntxent", "ntxent-cosine", "macl", "sogclr", "isogclr", "dystress")
