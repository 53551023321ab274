"""Where a module computes, for models dispatched over devices (accelerate `device_map`, CPU/disk offload).

A dispatched module may keep its weights on the meta device and load them only around its forward pass;
its accelerate hook knows the device it runs on. Without accelerate hooks, a module runs where its weights are.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..errors import AlvtsError


def _hooks(module: nn.Module) -> list[object]:
    """The accelerate hooks on `module` itself (a SequentialHook is unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", (hook,)))


def _meta_weights(module: nn.Module) -> AlvtsError:
    return AlvtsError(
        f"the weights of {type(module).__name__} are on the meta device and no accelerate hook loads them; "
        "load the model with its weights, or dispatch it with accelerate (device_map)"
    )


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its (or a submodule's) accelerate execution device, else its weights'."""
    for submodule in module.modules():
        for hook in _hooks(submodule):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
    parameter = next(module.parameters(), None)
    if parameter is None:
        raise AlvtsError(f"{type(module).__name__} has no parameters to tell its device")
    if parameter.is_meta:
        raise _meta_weights(module)
    return parameter.device


@contextmanager
def _kept_loaded(module: nn.Module, hook: object) -> Iterator[None]:
    """Load an offloading hook's weights into `module` and keep them there, even across the module's own calls."""
    hook.pre_forward(module)
    hook.offload = False
    try:
        yield
    finally:
        hook.offload = True
        hook.post_forward(module, None)


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `module`'s offloaded weights stay loaded on their execution device (no-op otherwise).

    Submodules may be called inside the block; `module` itself must not be, since its own hook would load it anew.
    """
    with ExitStack() as stack:
        for submodule in module.modules():
            for hook in _hooks(submodule):
                if getattr(hook, "offload", False):
                    stack.enter_context(_kept_loaded(submodule, hook))
        if any(p.is_meta for p in module.parameters()):
            raise _meta_weights(module)
        yield module


def follow_class_forward(module: nn.Module) -> None:
    """After swapping `module`'s class, point an accelerate hook's saved forward at the new class's forward.

    accelerate wraps a dispatched module's forward and calls the bound method it saved at dispatch time, which
    would bypass the swapped-in class.
    """
    if "_old_forward" in vars(module):
        module._old_forward = types.MethodType(type(module).forward, module)


def align_tensors(state: object, device: torch.device) -> None:
    """Move the tensor attributes of `state` to `device` in place (per-pass state shared across devices)."""
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor) and value.device != device:
            setattr(state, name, value.to(device))
