"""Model loaders and builders: classifiers, causal LMs (HF folder or GGUF), encoders, static embeddings, and
students cut from a teacher."""

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Unique parameters: ``parameters()`` yields a tied embedding/head weight once."""
    return sum(p.numel() for p in model.parameters())
