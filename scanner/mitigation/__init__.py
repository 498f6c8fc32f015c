"""Neuron-level mitigation of memorization and its evaluation.

- `search`: NeMo's neuron search (initial selection, refinement) over a score callback.
- `signal`: NeMo's memorization signal on a diffusers UNet, and one prompt's localization.
- `score`: the FB-Mem paper's Table 2 mitigation score over labels before and after.
"""
