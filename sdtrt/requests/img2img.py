"""The image side of img2img and inpainting: resizing, masks, "only masked" crops, and pasting back.

Follows AUTOMATIC1111's order (resize the init image and mask to the target size with the resize mode, blur
the mask, optionally crop around it) and uses diffusers' own VaeImageProcessor for every pixel operation, so
the tensors are exactly what diffusers' img2img/inpaint pipelines would build from the same pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.pictures import MAX_PICTURE_PIXELS

if TYPE_CHECKING:  # (request.py's table reads this module's choices: no import back at run time)
    import torch

    from sdtrt.requests.request import Img2ImgRequest

# A1111 resize mode -> diffusers VaeImageProcessor resize_mode
RESIZE_MODES = {"Just resize": "default", "Crop and resize": "crop", "Resize and fill": "fill"}
# A1111's "Masked content" (inpainting_fill 0..3): what the masked area starts from. "fill" paints it with the
# surrounding colours before encoding; the latent ones replace its latents (sdtrt.pipeline.jobs).
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")
LATENT_FILLS = ("latent noise", "latent nothing")


@dataclass
class ImageInputs:
    init: torch.Tensor  # [1, 3, H, W] in [-1, 1]: what the VAE encodes
    original: Image.Image  # the init image at the target size (pasted back outside the mask)
    mask: torch.Tensor | None = None  # [1, 1, H, W], 1 = repaint (binarized)
    masked: torch.Tensor | None = None  # init with the repainted area zeroed (the inpainting U-Net's hint)
    overlay_mask: Image.Image | None = None  # the blurred mask at the target size
    crop: tuple[int, int, int, int] | None = None  # "Only masked": the region that was inpainted
    blend: torch.Tensor | None = None  # [1, 1, h, w] at the latents' size: A1111's latent mask, where it is asked
    # for (its own picture, or the mask unrounded); None: the mask, at the latents' size
    soft_masks: list[Image.Image] | None = None  # Soft Inpainting's overlay masks, one per image, once sampled

    def to(self, device: "torch.device") -> "ImageInputs":
        """The same inputs with the tensors on ``device`` (the pictures stay PIL images)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, init=move(self.init), mask=move(self.mask), masked=move(self.masked),
                       blend=move(self.blend))


def _processors(vae_scale_factor: int, binarize: bool = True):
    # diffusers only where pictures are prepared: requests load in a client-only install, which has none
    from diffusers.image_processor import VaeImageProcessor

    image = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    mask = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=binarize,
                             do_convert_grayscale=True)
    return image, mask


def latent_blend(mask: Image.Image, size: tuple[int, int], rounded: bool) -> torch.Tensor:
    """A1111's latent mask: the mask as RGB resized to the latents' ``size`` (w, h) with Pillow's default filter,
    its red channel in [0, 1], rounded to 0 or 1 unless ``rounded`` is off -> [1, 1, h, w]."""
    import torch  # only where pictures are prepared (as diffusers above): a client-only install has none

    cells = np.asarray(mask.convert("RGB").resize(size), dtype=np.float32)[..., 0] / 255
    return torch.from_numpy(np.around(cells) if rounded else cells)[None, None]


def _pil(array: np.ndarray, mode: str, field: str) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise InvalidRequest(field, f"<{array.dtype} array>", "uint8 pixels")
    if array.ndim >= 2 and not 0 < array.shape[0] * array.shape[1] <= MAX_PICTURE_PIXELS:
        # before any resizing: the work of every later step grows with the picture
        raise InvalidRequest(field, f"<{array.shape[1]}x{array.shape[0]} picture>",
                             f"a picture of 1 to {MAX_PICTURE_PIXELS:,} pixels (it is resized to the request's width "
                             "and height anyway: send it smaller)")
    if mode == "RGB" and (array.ndim != 3 or array.shape[2] != 3):
        raise InvalidRequest(field, f"<array of shape {list(array.shape)}>", "an H x W x 3 RGB image")
    if mode == "L":
        if array.ndim == 3 and array.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("L")
        if array.ndim != 2:
            raise InvalidRequest(field, f"<array of shape {list(array.shape)}>", "an H x W grayscale mask")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def fill_masked_area(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the hole takes the colours around it. The unmasked pixels, premultiplied by their alpha so
    that the hole adds nothing, are blurred at shrinking radii and stacked over each other; the last layer (no
    blur) puts the unmasked pixels back as they were."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    filled = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(layers):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


def prepare_images(init_image: np.ndarray | None, mask: np.ndarray | None, request: Img2ImgRequest,
                   vae_scale_factor: int, latent_mask: np.ndarray | None = None) -> ImageInputs:
    """The request's picture and mask at its size, as its resize mode, mask blur, "only masked" area (with its
    padding) and masked content say, prepared as diffusers' pipelines prepare them; A1111's own latent mask where
    the request asks for one (``latent_mask``, or ``mask_round`` off)."""
    width, height, resize_mode, mask_blur = request.width, request.height, request.resize_mode, request.mask_blur
    inpaint_full_res, padding = request.inpaint_full_res, request.inpaint_full_res_padding
    inpainting_fill = request.inpainting_fill
    if init_image is None:
        raise InvalidRequest("init_image", None, "an H x W x 3 uint8 RGB picture (img2img needs one)")
    image_proc, mask_proc = _processors(vae_scale_factor)
    mode = RESIZE_MODES[resize_mode]
    original = image_proc.resize(_pil(init_image, "RGB", "init_image"), height, width, resize_mode=mode)
    if mask is None:
        if latent_mask is not None:
            raise InvalidRequest("latent_mask", "<a picture>", "sent with a mask (it blends the mask's inpainting)")
        return ImageInputs(init=image_proc.preprocess(original, height, width), original=original)

    overlay_mask = mask_proc.resize(_pil(mask, "L", "mask"), height, width, resize_mode=mode)
    if mask_blur > 0:
        overlay_mask = mask_proc.blur(overlay_mask, mask_blur)
    if not np.asarray(overlay_mask).any():
        raise InvalidRequest("mask", "<all black>", "a mask with white where the image should be repainted")
    crop, fit = None, "default"
    if inpaint_full_res:
        crop, fit = mask_proc.get_crop_region(overlay_mask, width, height, pad=padding), "fill"
    start = fill_masked_area(original, overlay_mask) if inpainting_fill == "fill" else original
    init = image_proc.preprocess(start, height, width, crops_coords=crop, resize_mode=fit)
    binary = mask_proc.preprocess(overlay_mask, height, width, resize_mode=fit, crops_coords=crop)
    blend = None
    cells = (width // vae_scale_factor, height // vae_scale_factor)
    rounded = request.mask_round and not request.soft_inpainting  # (A1111's Soft Inpainting turns rounding off)
    if latent_mask is not None:  # A1111 takes it as sent: no blur, no resize to the request's size
        blend = latent_blend(_pil(latent_mask, "L", "latent_mask"), cells, rounded)
    elif not rounded:  # the mask the latents see, at the request's size, blurred and not binarized
        soft = _processors(vae_scale_factor, binarize=False)[1].preprocess(overlay_mask, height, width,
                                                                            resize_mode=fit, crops_coords=crop)
        blend = latent_blend(Image.fromarray(np.around(soft[0, 0].numpy() * 255).astype(np.uint8)), cells, False)
    return ImageInputs(init=init, original=original, mask=binary, masked=init * (binary < 0.5),
                       overlay_mask=overlay_mask, crop=crop, blend=blend)


def finish_images(images: np.ndarray, inputs: ImageInputs, vae_scale_factor: int,
                  masks: list[Image.Image] | None = None) -> np.ndarray:
    """Inpainting: paste the original pixels back outside the (blurred) mask, and an "only masked" result back
    into its place, as A1111 (and diffusers' apply_overlay) do. img2img results pass through unchanged.
    ``masks``: one overlay mask per image at the generated size in place of the request's (Soft Inpainting's),
    put into the crop's place on a black (keep the original) mask of the picture's size, as A1111's uncrop."""
    if inputs.overlay_mask is None:
        return images
    image_proc, _ = _processors(vae_scale_factor)
    overlays = [inputs.overlay_mask] * len(images) if masks is None else masks
    if masks is not None and inputs.crop is not None:
        x, y, x2, y2 = inputs.crop
        overlays = []
        for mask in masks:
            whole = Image.new("L", inputs.original.size)
            whole.paste(image_proc.resize(mask, height=y2 - y, width=x2 - x, resize_mode="crop"), (x, y))
            overlays.append(whole)
    return np.stack([
        np.asarray(image_proc.apply_overlay(overlay, inputs.original, Image.fromarray(im), inputs.crop))
        for overlay, im in zip(overlays, images)
    ])


def to_model_input(pictures: list[Image.Image], vae_scale_factor: int) -> "torch.Tensor":
    """PIL pictures -> [N, 3, H, W] in [-1, 1], exactly as diffusers' pipelines preprocess them."""
    image_proc, _ = _processors(vae_scale_factor)
    return image_proc.preprocess(pictures)
