"""Evaluation in one place: Fréchet distances and their detectors (frechet, dinov2) for generation,
PSNR / SSIM / LPIPS (image_quality) for inverse problems."""
