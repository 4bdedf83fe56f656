"""Training one-step SR models (imports `pipelines/`; `pipelines/` and `nodes/` never import this package).

`data/` (Real-ESRGAN degradation, datasets), `losses/` (LPIPS, DISTS, EA-DISTS), `objectives/` (one module per
method: what is trained and the dict of losses), `config.py` (the typed config), `loop.py` (the accelerate loop:
precision, accumulation, checkpoints, exact resume, validation, logging, export).
"""
