"""The embedded domain-shift experiments: a fair comparison of FT, LP, LP-FT, DAFT and DAFT's
ablations, on generated data (segmentation through mmseg: :mod:`.segmentation`; a torch-only
classification twin: :mod:`.classification`). ``tools/demo.py`` is the command line."""
