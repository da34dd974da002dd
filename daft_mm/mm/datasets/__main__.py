"""``python -m daft_mm.mm.datasets ROOT [--which cityscapes|voc|both] [--num-train N] ...``:
write the tiny synthetic datasets (see :mod:`daft_mm.mm.datasets.synthetic`)."""
from .synthetic import main

main()
