"""Long-tailed SimCLR comparison of temperature-aware contrastive losses.

``python -m recipes.longtail`` trains the same SimCLR model on a long-tailed dataset once per
loss (NT-Xent, NT-Xent with a cosine temperature schedule, SogCLR, iSogCLR, DySTreSS), evaluates
each run with kNN and a linear probe per class group, relates iSogCLR's learned temperatures to
class frequency, and writes a report folder. See ``recipes/longtail/README.md``.
"""
