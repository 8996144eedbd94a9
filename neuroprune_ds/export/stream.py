"""Run a model whose weights are not in memory: each module's parameters are fetched right before its
forward and dropped right after, so a forward pass holds one module's weights at a time (plus activations).

This is how the converter computes logits of a model of any size, both of the masked checkpoint and of the
written export, without a full copy of either: the model is an empty skeleton (parameters on the meta
device, buffers real, as ``accelerate.init_empty_weights`` builds it) and ``fetch`` reads a tensor by name.
Every module of the supported families reads its own parameters only inside its own ``forward`` (other
modules' parameters at most for their dtype, which stays fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Fetch = Callable[[str], torch.Tensor]


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same parameter (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(param), name)
            for name, param in model.named_parameters(remove_duplicate=False)}


def persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Names of the buffers a state dict holds."""
    persistent = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name in persistent]


@torch.no_grad()
def streamed_logits(model: torch.nn.Module, fetch: Fetch, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``batch`` with every parameter and persistent buffer read from ``fetch``.

    Args:
        model: an empty skeleton in eval mode; it is left with every parameter on the meta device (tied
            parameters no longer shared).
        fetch: name -> tensor of that parameter or buffer (any floating dtype; computed in fp32).
        batch: the model's inputs.
    """
    for name in persistent_buffers(model):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = fetch(name)
        module._buffers[leaf] = tensor.float() if tensor.is_floating_point() else tensor
    handles = []
    for module_name, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            prefix = f"{module_name}." if module_name else ""
            handles.append(module.register_forward_pre_hook(_loader(fetch, prefix, own)))
            handles.append(module.register_forward_hook(_releaser(own)))
            _release(module, own)
    try:
        return model(**batch).logits.float()
    finally:
        for handle in handles:
            handle.remove()


def _loader(fetch: Fetch, prefix: str, names: list[str]):
    def load(module: torch.nn.Module, args) -> None:
        for name in names:
            module._parameters[name] = torch.nn.Parameter(fetch(prefix + name).float(), requires_grad=False)
    return load


def _releaser(names: list[str]):
    def release(module: torch.nn.Module, args, output) -> None:
        _release(module, names)
    return release


def _release(module: torch.nn.Module, names: list[str]) -> None:
    """Parameters back to the meta device, fp32: modules that read a dtype from another module's weight
    (T5's FFN casts to ``wo.weight.dtype``) see the dtype the pass computes in."""
    for name in names:
        meta = module._parameters[name].to("meta")
        meta = meta.float() if meta.is_floating_point() else meta
        module._parameters[name] = torch.nn.Parameter(meta, requires_grad=False)
