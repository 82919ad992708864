"""V-MoE: a timm VisionTransformer whose MLP in selected blocks is a Mixture-of-Experts layer.

Importing this module registers the timm architectures ``vmoe_tiny_mnist``, ``vmoe_ti16_e8_k2``,
``vmoe_s16_e8_k2`` and the dense ``vit_tiny_mnist``, so ``timm.create_model`` can build them.
No pretrained weights are hosted for them: load a local checkpoint with ``checkpoint_path=``, or
upcycle a dense ViT with ``upcycle_from=`` or ``upcycle_from_dense``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import load_state_dict as timm_load_state_dict
from timm.models._helpers import clean_state_dict
from timm.models.vision_transformer import Block, VisionTransformer

from .vmoe_layers import VMoEMlp

__all__ = [
    "VMoEVisionTransformer",
    "resolve_moe_layers",
    "upcycle_from_dense",
    "vmoe_tiny_mnist",
    "vmoe_ti16_e8_k2",
    "vmoe_s16_e8_k2",
    "vit_tiny_mnist",
]

MoELayerSpec = Union[str, Sequence[int]]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def resolve_moe_layers(depth: int, moe_layers: MoELayerSpec) -> tuple[int, ...]:
    """Return the sorted indices of the blocks that get an MoE layer.

    Args:
        depth: Number of transformer blocks.
        moe_layers: One of ``"every_other"`` for the odd blocks 1, 3, 5, ..., ``"last_<n>"`` (for
            example ``"last_2"``) for the last n odd blocks as in V-MoE's "Last n" models, or a
            sequence of block indices. Negative indices count from the end.
    """
    odd_blocks = list(range(1, depth, 2))
    if isinstance(moe_layers, str):
        if moe_layers == "every_other":
            return tuple(odd_blocks)
        if moe_layers.startswith("last_") and moe_layers[len("last_"):].isdigit():
            count = int(moe_layers[len("last_"):])
            if count > len(odd_blocks):
                raise ValueError(
                    f"moe_layers={moe_layers!r} asks for {count} odd blocks, but depth={depth} has only "
                    f"{len(odd_blocks)}"
                )
            return tuple(odd_blocks[len(odd_blocks) - count:])
        raise ValueError(
            f"moe_layers={moe_layers!r} is invalid; expected 'every_other', 'last_<n>' or a list of block indices"
        )

    indices = []
    for index in moe_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(f"moe_layers entry {index!r} is invalid; expected an int in [{-depth}, {depth})")
        indices.append(index % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe_layers={list(moe_layers)} names a block more than once")
    return tuple(sorted(indices))


def _build_block(block_fn: Callable[..., nn.Module], moe_indices: frozenset, moe_mlp: Callable, **kwargs):
    """Build one transformer block, with the MoE layer as its MLP if its index is in ``moe_indices``."""
    if kwargs.get("depth") in moe_indices:
        kwargs["mlp_layer"] = moe_mlp
    return block_fn(**kwargs)


class VMoEVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with a ``VMoEMlp`` in place of ``blocks[i].mlp`` for the MoE blocks.

    All ``VisionTransformer`` arguments pass through. The dense parts use timm's initialisation,
    and the routers and experts use truncated normal weights (std 0.02) with zero biases in every
    ``weight_init`` mode.
    """

    def __init__(
            self,
            *,
            num_experts: int = 8,
            top_k: int = 2,
            moe_layers: MoELayerSpec = "every_other",
            capacity_factor: Optional[float] = None,
            batch_priority: bool = False,
            router_noise_std: Optional[float] = None,
            importance_loss_weight: float = 0.005,
            load_loss_weight: float = 0.005,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            num_experts: Experts per MoE layer E.
            top_k: Experts per token k in every MoE layer; change it per layer through
                ``blocks[i].mlp.router.top_k``.
            moe_layers: Placement, see ``resolve_moe_layers``.
            capacity_factor: Capacity factor C >= 0, or None for no token dropping (the default,
                meant for evaluation).
            batch_priority: Use Batch Priority Routing when capacity drops token-expert pairs.
            router_noise_std: Std of the training noise on the router logits; None means 1/E.
            importance_loss_weight: Weight of the importance loss in each layer's ``aux_loss``.
            load_loss_weight: Weight of the load loss in each layer's ``aux_loss``.
            **kwargs: ``VisionTransformer`` arguments.
        """
        depth = kwargs.get("depth", 12)
        moe_indices = resolve_moe_layers(depth, moe_layers)
        moe_mlp = partial(
            VMoEMlp,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            router_noise_std=router_noise_std,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
        )
        block_fn = kwargs.pop("block_fn", Block)
        kwargs["block_fn"] = partial(_build_block, block_fn, frozenset(moe_indices), moe_mlp)
        super().__init__(**kwargs)

        for index in moe_indices:
            if not isinstance(getattr(self.blocks[index], "mlp", None), VMoEMlp):
                raise ValueError(
                    f"block_fn={block_fn!r} did not build blocks[{index}].mlp from its mlp_layer argument, "
                    "so it cannot hold an MoE layer; use timm's Block"
                )
        self.moe_layer_indices = moe_indices

    def fix_init_weight(self) -> None:
        """Divide each block's attention projection and fc2 weights by sqrt(2 * (index + 1)), as timm does."""
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                block.attn.proj.weight.div_(scale)
                if isinstance(block.mlp, VMoEMlp):
                    block.mlp.experts.fc2_weight.div_(scale)
                else:
                    block.mlp.fc2.weight.div_(scale)

    def named_moe_layers(self) -> Iterator[tuple[str, VMoEMlp]]:
        """Yield ``(name, module)`` for each MoE layer, for example ``("blocks.1.mlp", VMoEMlp)``."""
        for index in self.moe_layer_indices:
            yield f"blocks.{index}.mlp", self.blocks[index].mlp

    def aux_loss(self) -> torch.Tensor:
        """Return the sum of the MoE layers' auxiliary losses from the last forward.

        The result is a zero scalar in eval mode, so a training loop may always add it to the loss.
        """
        total = next(self.parameters()).new_zeros(())
        if not self.training:
            return total
        for _, layer in self.named_moe_layers():
            if layer.aux_loss is not None:
                total = total + layer.aux_loss
        return total


def _load_dense_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return dict(clean_state_dict(dict(source)))
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dense checkpoint not found: {path}")
    # timm's loader reads .safetensors and torch files, unwraps 'state_dict' / 'model' entries and
    # prefers EMA weights when the checkpoint has them.
    return dict(timm_load_state_dict(path))


@torch.no_grad()
def upcycle_from_dense(
        model: VMoEVisionTransformer,
        dense_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
        router_init_std: float = 0.02,
        seed: int = 0,
) -> VMoEVisionTransformer:
    """Load a dense timm ViT's weights into ``model`` by sparse upcycling, in place.

    Every non-MoE weight is copied as is. In each MoE block the dense ``mlp.fc1`` and ``mlp.fc2``
    weights and biases are copied into every expert, and the router weight is drawn from a
    truncated normal with std ``router_init_std`` by a generator seeded with ``seed``. With no
    capacity limit and k = E the upcycled model computes the dense model's function, because the
    softmax weights of all experts sum to 1.

    Args:
        model: The V-MoE to fill; its architecture must match the dense model apart from the MLPs.
        dense_state_dict: A state dict, or the path of a local ``.pth`` / ``.safetensors`` file.
        router_init_std: Std of the router weights.
        seed: Seed for the router weights.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: The checkpoint path does not exist.
        KeyError: The dense weights lack an MLP weight of an MoE block.
        RuntimeError: ``load_state_dict`` found missing, unexpected or mismatched weights.
    """
    state_dict = _load_dense_state_dict(dense_state_dict)
    generator = torch.Generator().manual_seed(seed)

    for name, layer in model.named_moe_layers():
        num_experts = layer.router.num_experts
        for dense_key, expert_key in (
                ("fc1.weight", "fc1_weight"),
                ("fc1.bias", "fc1_bias"),
                ("fc2.weight", "fc2_weight"),
                ("fc2.bias", "fc2_bias"),
        ):
            full_dense_key = f"{name}.{dense_key}"
            if full_dense_key not in state_dict:
                if getattr(layer.experts, expert_key) is None:
                    continue
                raise KeyError(f"Dense state dict has no {full_dense_key!r}, which MoE layer {name} needs")
            dense_tensor = state_dict.pop(full_dense_key)
            state_dict[f"{name}.experts.{expert_key}"] = dense_tensor.unsqueeze(0).repeat(
                num_experts, *([1] * dense_tensor.dim())
            )

        router_weight = torch.empty(layer.router.weight.shape, dtype=torch.float32)
        nn.init.trunc_normal_(router_weight, std=router_init_std, generator=generator)
        state_dict[f"{name}.router.weight"] = router_weight

    model.load_state_dict(state_dict, strict=True)
    return model


def _create_vmoe(variant: str, pretrained: bool = False, **kwargs: Any) -> VMoEVisionTransformer:
    upcycle_from = kwargs.pop("upcycle_from", None)
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(
        VMoEVisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if upcycle_from is not None:
        upcycle_from_dense(model, upcycle_from)
    return model


def _mnist_cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def _imagenet_cfg(**kwargs: Any) -> dict[str, Any]:
    # Same eval transforms as timm's ViT ImageNet-1k configs.
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# timm's register_model reads this module-level name to attach pretrained cfgs (data config) to the
# architectures, so it must be defined before the decorated functions.
default_cfgs = generate_default_cfgs({
    "vmoe_tiny_mnist": _mnist_cfg(),
    "vit_tiny_mnist": _mnist_cfg(),
    "vmoe_ti16_e8_k2": _imagenet_cfg(),
    "vmoe_s16_e8_k2": _imagenet_cfg(),
})

TINY_MNIST_ARGS = dict(patch_size=4, embed_dim=64, depth=8, num_heads=4, mlp_ratio=2.0)
"""Architecture of ``vmoe_tiny_mnist`` and its dense twin ``vit_tiny_mnist`` (28x28 grayscale, 50 tokens)."""


@register_model
def vmoe_tiny_mnist(pretrained: bool = False, **kwargs: Any) -> VMoEVisionTransformer:
    """V-MoE for 28x28 grayscale digits: D=64, 8 blocks, 4 heads, MLP 128, E=8, k=2 at blocks 1, 3, 5, 7."""
    model_args = dict(TINY_MNIST_ARGS, num_experts=8, top_k=2)
    return _create_vmoe("vmoe_tiny_mnist", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_tiny_mnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Dense ViT with the architecture of ``vmoe_tiny_mnist``, the source model for upcycling it."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        "vit_tiny_mnist",
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(TINY_MNIST_ARGS, **kwargs),
    )


@register_model
def vmoe_ti16_e8_k2(pretrained: bool = False, **kwargs: Any) -> VMoEVisionTransformer:
    """V-MoE with the ViT-Ti/16 shape at 224x224 (D=192, 12 blocks, 3 heads), E=8, k=2 at odd blocks.

    Upcycle it from timm's ``vit_tiny_patch16_224`` weights.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, num_experts=8, top_k=2)
    return _create_vmoe("vmoe_ti16_e8_k2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmoe_s16_e8_k2(pretrained: bool = False, **kwargs: Any) -> VMoEVisionTransformer:
    """V-MoE with the ViT-S/16 shape at 224x224 (D=384, 12 blocks, 6 heads), E=8, k=2 at odd blocks.

    Upcycle it from timm's ``vit_small_patch16_224`` weights.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_experts=8, top_k=2)
    return _create_vmoe("vmoe_s16_e8_k2", pretrained=pretrained, **dict(model_args, **kwargs))
