"""Compression of trained models: quantization, pruning, low-rank factorization, distillation, LoRA.

  weights.py    compressed stand-ins for projection parameters (quantized, fake-quantized,
                low-rank, LoRA) and `restructure`, which swaps them into a built model
  quantize.py   quantization mechanics on qwix: per-channel / grouped scales, int4 packing,
                static activation scales (W8A8), straight-through fake quantization (QAT)
  prune.py      magnitude and 2:4 masks, and the optax wrapper that keeps pruned entries at zero
  lowrank.py    truncated SVD with the rank from an energy threshold
  distill.py    the distillation loss and the frozen teacher inside the student
  training.py   what the train step needs: model structure, frozen parameters, optimizer masks
  run.py        `--mode=compress`: checkpoint in, compressed checkpoint and report out
"""
