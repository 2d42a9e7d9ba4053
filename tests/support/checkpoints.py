"""Tiny checkpoints and networks for the tests, built in a temporary folder by the project's own writer (never taken from models/checkpoints or ../shared).

``tiny_checkpoint`` writes a depth-8, width-4 PreActResNet with random batch-norm statistics
(so its outputs depend on the image), ``tiny_served`` loads one as a worker serves it; ``service_models`` a model folder as the test stacks
serve it; ``make_tiny_model`` the same network in memory on 32 x 32 inputs.
"""

from __future__ import annotations

from pathlib import Path

SERVICE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _random_batch_norm(model, seed: int, bias: bool = False) -> None:
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random BN statistics, so the outputs depend on the image
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if bias:
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


def tiny_checkpoint(path: Path, in_channels: int, size: int, classes: list[str], seed: int) -> None:
    """Write a tiny preact_resnet checkpoint (``in_channels`` x ``size`` x ``size`` inputs, mean
    0.5 and std 0.25 per channel) to ``path``."""
    import torch

    from models.nn.registry import create_model
    from models.store.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(seed)
    args = dict(
        depth=8, width=4, num_classes=len(classes), in_channels=in_channels, input_size=size, zero_init_residual=False
    )
    model = create_model("preact_resnet", **args)
    _random_batch_norm(model, seed)
    meta = CheckpointMeta(
        arch="preact_resnet",
        arch_args=args,
        classes=classes,
        input_size=size,
        in_channels=in_channels,
        mean=[0.5] * in_channels,
        std=[0.25] * in_channels,
        metrics={"test_accuracy": 0.1, "n": 10, "seed": seed},
    )
    save_checkpoint(path, model, meta)


def tiny_served(folder: Path, name: str, in_channels: int, size: int, classes: list[str], seed: int):
    """A worker's ``ServedModel`` named ``name`` of a ``tiny_checkpoint`` written in ``folder``, on the CPU."""
    import torch

    from worker.served import ServedModel

    path = folder / f"{name}.safetensors"
    tiny_checkpoint(path, in_channels, size, classes, seed)
    return ServedModel.load(name, path, torch.device("cpu"))


def make_tiny_model(activation: str = "relu", seed: int = 0, num_classes: int = 10, in_channels: int = 3):
    """Depth-8, width-4 PreActResNet on 32x32 inputs with random BN statistics (so the
    residual branches and the head are not trivial), in eval mode."""
    import torch

    from models.nn.resnet import PreActResNet

    torch.manual_seed(seed)
    model = PreActResNet(
        depth=8,
        width=4,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=32,
        activation=activation,
        zero_init_residual=False,
    )
    _random_batch_norm(model, seed, bias=True)
    return model.eval()


def stability_reference_images(n: int = 6, seed: int = 5):
    """uint8 n x 28 x 28 grey images (gradients and noise): the "evaluation images" whose
    ARA radii tiny-grey records in its metrics (ara_radii)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    out = []
    for i in range(n):
        base = (xx * (i % 3) + yy * (2 - i % 3)) / 2.0 * 0.7 + rng.random((28, 28)) * 0.3
        out.append((np.clip(base, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)


def record_ara_radii(path: Path) -> None:
    """Store the per-image ARA radii (the ARA settings: S 450, eps 20) of
    ``stability_reference_images`` in the checkpoint's metrics, as the trainer does; the
    labels are the model's own predictions, so every image counts as correct."""
    import torch

    from models.perturb.ara import compute_ara
    from models.store.checkpoint import load_checkpoint, update_metadata

    model, _ = load_checkpoint(path)
    images = torch.from_numpy(stability_reference_images())[:, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only fight over the shared cores
    try:
        with torch.no_grad():
            labels = model(images.float() / 255.0).argmax(1)
        res = compute_ara(model, images, labels, bound_check=False)
    finally:
        torch.set_num_threads(threads)
    update_metadata(path, metrics={"ara_radii": res.radii_record("tests:stability_reference_images", 5)})


def service_models(folder: Path) -> Path:
    """Write the test stacks' model folder: tiny-rgb (32x32 RGB, 10 named classes;
    <name>/model.safetensors) and tiny-grey (28x28 grey, 2 classes; <name>.safetensors; its
    metrics hold the ARA radii of ``stability_reference_images``). Returns ``folder``."""
    tiny_checkpoint(folder / "tiny-rgb" / "model.safetensors", 3, 32, SERVICE_CLASSES, seed=0)
    tiny_checkpoint(folder / "tiny-grey.safetensors", 1, 28, ["normal", "pneumonia"], seed=1)
    record_ara_radii(folder / "tiny-grey.safetensors")
    return folder
