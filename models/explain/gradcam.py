"""Grad-CAM (Selvaraju et al. 2017), batched, on the model's device.

For class c and a target layer with activations A (K x h x w):
alpha_k = mean over h x w of d logit_c / d A_k; map = ReLU(sum_k alpha_k A_k); upsample
bilinearly (half-pixel centres, like OpenCV's INTER_LINEAR) to the input size; scale to
[0, 1] per image by min-max. ``pytorch_grad_cam.GradCAM`` min-max scales before and after
upsampling; bilinear upsampling commutes with that affine map, so the results agree.

The forward hook that captures A is registered inside a context manager and always
removed, even when the forward pass raises; it acts on the forward passes of the thread that
registered it only.

Only the part of the network after the target layer needs a graph: the forward runs without
autograd up to the layer, whose output the hook hands on as a fresh leaf that requires grad
(switching recording on for the rest of the forward), so the backward is the short way from
the logits to A. The batch runs channels-last (NHWC) on the CPU, where oneDNN's convolutions
are faster in that layout; the maps agree with the NCHW ones to float rounding."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import BadParameterError
from models.nn.runtime import eval_mode, model_device


def default_gradcam_layer(model: nn.Module) -> nn.Module:
    """``model.gradcam_layer`` when the model names one; else ``layer4`` (torchvision
    ResNets, also inside a wrapper's ``net``); else the last Conv2d of the model."""
    layer = getattr(model, "gradcam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    for holder in (model, getattr(model, "net", None)):
        layer = getattr(holder, "layer4", None) if holder is not None else None
        if isinstance(layer, nn.Module):
            return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BadParameterError(f"{type(model).__name__} has no gradcam_layer, layer4 or Conv2d; name a target layer")
    return convs[-1]


def resolve_layer(model: nn.Module, layer: nn.Module | str | None = None) -> nn.Module:
    """The target layer: a module, a dotted name (e.g. "pipe.3", "pipe.3.6.main.2"), or
    None for ``default_gradcam_layer``."""
    if layer is None:
        return default_gradcam_layer(model)
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise BadParameterError("the target layer is not a submodule of the model")
        return layer
    try:
        return model.get_submodule(str(layer))
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise BadParameterError(
            f"no layer named {layer!r} in {type(model).__name__} (names look like: {', '.join(names)}, ...)"
        ) from None


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """Dotted name of ``layer`` inside ``model`` ('' for the model itself)."""
    for name, m in model.named_modules():
        if m is layer:
            return name
    raise BadParameterError("the layer is not a submodule of the model")


def _on(owner: int) -> bool:
    """Whether this forward runs on the thread that registered the hook: a module's hooks
    fire for every thread's forward, and another thread may be running the same model (an
    explanation's stability searches beside its Grad-CAM, ``models.explain.beside``)."""
    return threading.get_ident() == owner


@contextmanager
def capture_outputs(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every output of ``layer`` during the block; the hook is removed on exit."""
    outputs: list[torch.Tensor] = []
    owner = threading.get_ident()
    handle = layer.register_forward_hook(lambda _m, _inp, out: outputs.append(out) if _on(owner) else None)
    try:
        yield outputs
    finally:
        handle.remove()


@contextmanager
def graph_from(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """For a forward run under ``torch.no_grad()``: ``layer``'s output continues as a detached
    leaf that requires grad, with recording switched on for the rest of the forward (the
    no_grad block restores the mode when it ends). Yields the list of those leaves; the hook
    is removed on exit."""
    outputs: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(_m, _inp, out):
        if not _on(owner):
            return None
        if not isinstance(out, torch.Tensor):
            outputs.append(out)
            return None
        torch.set_grad_enabled(True)
        leaf = out.detach().requires_grad_(True)
        outputs.append(leaf)
        return leaf

    handle = layer.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def minmax_per_image(maps: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """N x H x W -> each map scaled to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    span = flat.max(1).values.view(-1, 1, 1) - lo
    return torch.where(span > floor, (maps - lo) / span.clamp_min(floor), torch.zeros_like(maps))


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    classes: Sequence[int] | torch.Tensor | int | None = None,
    layer: nn.Module | str | None = None,
) -> torch.Tensor:
    """Grad-CAM maps for a batch.

    x: float N x C x H x W in [0, 1] (or one image C x H x W). classes: one class per row,
    a single class for all rows, or None for each row's predicted class. layer: see
    ``resolve_layer``. Returns float N x H x W in [0, 1] on the model's device. The model
    runs in eval mode (restored afterwards); its parameters receive no gradients.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or not x.is_floating_point():
        raise BadParameterError(f"x must be a float N x C x H x W batch, got {tuple(x.shape)} {x.dtype}")
    target = resolve_layer(model, layer)
    device = model_device(model)
    x = x.detach().to(device)
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    n = x.shape[0]
    with eval_mode(model), graph_from(target) as outs:
        with torch.no_grad():  # restores the caller's grad mode when it ends
            logits = model(x)
        if len(outs) != 1:
            raise BadParameterError(
                f"target layer ran {len(outs)} times in one forward pass; pick a module that runs once"
            )
        acts = outs[0]
        if not isinstance(acts, torch.Tensor) or acts.ndim != 4:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise BadParameterError(f"target layer output must be N x K x h x w, got {shape}")
        if classes is None:
            cls = logits.argmax(1)
        else:
            cls = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1)
            if cls.numel() == 1 and n > 1:
                cls = cls.expand(n)
            if cls.numel() != n:
                raise BadParameterError(f"need one class per image ({n}), got {cls.numel()}")
            if int(cls.min()) < 0 or int(cls.max()) >= logits.shape[1]:
                raise BadParameterError(f"class indices must be in [0, {logits.shape[1]})")
        if not logits.requires_grad:
            raise BadParameterError("the logits do not depend on the target layer's output; pick a layer on the path")
        score = logits.gather(1, cls.view(-1, 1)).sum()
        grads = torch.autograd.grad(score, acts)[0]
    with torch.no_grad():
        alpha = grads.mean((2, 3), keepdim=True)
        cam = (alpha * acts.detach()).sum(1).clamp_min(0.0)
        cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return minmax_per_image(cam)
