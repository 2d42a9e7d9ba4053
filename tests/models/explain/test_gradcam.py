import threading

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from models.errors import BadParameterError
from models.explain.gradcam import (
    capture_outputs,
    default_gradcam_layer,
    gradcam,
    graph_from,
    layer_name,
    resolve_layer,
)
from models.render.colormap import heatmap_rgb, overlay_rgb


def oracle(model, layer, x, classes):
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hh_model"])
@pytest.mark.parametrize("layer", [None, "pipe.3", "pipe.2.0.main.2"])
def test_maps_equal_pytorch_grad_cam(request, fixture, layer, images):
    model = request.getfixturevalue(fixture)
    classes = [0, 3, 5, 9, 9, 1]
    ours = gradcam(model, images, classes, layer=layer)
    assert ours.shape == (6, 32, 32)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    theirs = oracle(model, resolve_layer(model, layer), images, classes)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    # Not a trivially constant map, and classes matter.
    assert float(ours.max()) == pytest.approx(1.0) and float(ours.std()) > 0.05
    other = gradcam(model, images, [(c + 1) % 10 for c in classes], layer=layer)
    assert not torch.allclose(ours, other, atol=1e-3)


def test_default_layer_and_predicted_class(tiny_model, images):
    assert default_gradcam_layer(tiny_model) is tiny_model.pipe[5]
    pred = tiny_model(images).argmax(1).tolist()
    torch.testing.assert_close(gradcam(tiny_model, images), gradcam(tiny_model, images, pred))
    assert layer_name(tiny_model, default_gradcam_layer(tiny_model)) == "pipe.5"


def test_default_layer_fallbacks():
    class WithLayer4(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer4 = nn.Conv2d(3, 4, 3)

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    w = WithLayer4()
    assert default_gradcam_layer(w) is w.layer4
    assert default_gradcam_layer(plain) is plain[2]
    with pytest.raises(BadParameterError):
        default_gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    with pytest.raises(BadParameterError, match="no layer named"):
        resolve_layer(plain, "pipe.9")


def test_hooks_removed_after_use_and_after_errors(tiny_model, images):
    layer = tiny_model.gradcam_layer
    gradcam(tiny_model, images, 0)
    assert len(layer._forward_hooks) == 0
    with pytest.raises(BadParameterError):
        gradcam(tiny_model, images, [99] * 6)  # raised inside the hook's context
    assert len(layer._forward_hooks) == 0

    class Boom(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom after the target layer ran")

    with pytest.raises(RuntimeError, match="boom"):
        gradcam(Boom(tiny_model), images, 0, layer="inner.pipe.5")
    assert len(layer._forward_hooks) == 0
    assert all(p.grad is None for p in tiny_model.parameters())


def test_hooks_act_on_the_forward_passes_of_their_own_thread_only(tiny_model, images):
    # Another thread running the same model while Grad-CAM's hooks are on (an explanation's
    # stability searches beside its Grad-CAM): its pass is neither captured nor cut.
    layer = tiny_model.gradcam_layer
    with torch.no_grad():
        alone = tiny_model(images)
    other: dict[str, torch.Tensor] = {}

    def run_other():
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            out = tiny_model(x)
            other["out"] = out.detach()
            (other["grad"],) = torch.autograd.grad(out[:, 0].sum(), x)  # the whole graph, back to the input

    with graph_from(layer) as leaves, capture_outputs(layer) as captured, torch.no_grad():
        thread = threading.Thread(target=run_other)
        thread.start()
        thread.join()
        assert leaves == [] and captured == []
        tiny_model(images)
        assert len(leaves) == 1 and len(captured) == 1
    assert torch.equal(other["out"], alone) and other["grad"].abs().sum() > 0


def test_heatmap_and_overlay_images():
    cam = torch.linspace(0, 1, 32 * 32).view(32, 32)
    heat = heatmap_rgb(cam)
    assert heat.shape == (32, 32, 3) and heat.dtype == np.uint8
    # jet: low values blue, high values red
    assert heat[0, 0, 2] > heat[0, 0, 0] and heat[-1, -1, 0] > heat[-1, -1, 2]
    img = torch.zeros(3, 32, 32)
    over = overlay_rgb(img, cam, alpha=0.5)
    assert over.shape == (32, 32, 3) and over.dtype == np.uint8
    np.testing.assert_allclose(over.astype(int), np.round(heat.astype(float) * 0.5), atol=1)
    grey = overlay_rgb(torch.ones(1, 32, 32), cam, alpha=0.0)
    assert np.all(grey == 255)
