"""Distillation losses, lowest layer above ``io``: pure functions of tensors.

- ``divergences``: the per-position divergences on logits (forward/reverse KL, JSD, skew KL, TVD) and the
  logits-level soft/hard loss of classifiers;
- ``mix``: the hard/soft mix, ``(1 - alpha)·s·KD + alpha·CE`` with ``s = T²``, written once for every task;
- ``chunked``: the same divergences from hidden states and an LM head, chunk by chunk (bounded memory);
- ``sparse``: top-k / sampled teacher targets (caches, recorded log-probs) and the hard-label CE, chunked;
- ``embedding``: sentence-vector and token-state losses of embedding students.
"""

IGNORE_INDEX = -100  # a label that is neither trained nor distilled (prompts, padding, unlabeled examples)
