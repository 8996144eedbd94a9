"""Export pruned NeuroPrune checkpoints as Hugging Face models (``neuroprune convert``).

- :mod:`neuroprune_ds.export.checkpoint`: the trainer's client state and fp32 weights of a DeepSpeed checkpoint,
  one tensor at a time.
- :mod:`neuroprune_ds.export.plan`: masks, what a compact export keeps, sparsity.
- :mod:`neuroprune_ds.export.convert`: dense and compact exports, verification, the command.
- :mod:`neuroprune_ds.export.stream`: forward passes of a model whose weights are read one module at a time.
- :mod:`neuroprune_ds.export.safetensors_stream`: safetensors files written one tensor at a time.
- :mod:`neuroprune_ds.export.compact_models`: self-contained compact model classes per family (importing
  this package registers them with transformers' Auto factories).
"""

NEUROPRUNE_JSON = "neuroprune.json"
"""The record every export carries beside its weights: kept heads and units, sparsity, source, verification."""
