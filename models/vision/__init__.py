"""Vision models. Importing this package registers the V-MoE architectures with timm."""
from .vmoe import (
    TINY_MNIST_ARGS,
    VMoEVisionTransformer,
    resolve_moe_layers,
    upcycle_from_dense,
)
from .vmoe_layers import (
    VMoEExperts,
    VMoEMlp,
    VMoERouter,
    compute_capacity_mask,
    compute_expert_capacity,
    importance_loss,
    load_loss,
)

__all__ = [
    "TINY_MNIST_ARGS",
    "VMoEExperts",
    "VMoEMlp",
    "VMoERouter",
    "VMoEVisionTransformer",
    "compute_capacity_mask",
    "compute_expert_capacity",
    "importance_loss",
    "load_loss",
    "resolve_moe_layers",
    "upcycle_from_dense",
]
