"""Random [B, T] masks shared by the kernel tests (padding on either side, holes, an all-masked row)."""
import torch

MASK_KINDS = ("right", "left", "holes")


def make_mask(B, T, kind, device):
    """bool [B, T]: right / left padding with random lengths (row 0 full), or random holes; the last row all masked."""
    if kind == "holes":
        m = torch.rand(B, T, device=device) < 0.6
    else:
        lengths = torch.randint(0, T + 1, (B,), device=device)
        lengths[0] = T
        t = torch.arange(T, device=device)
        m = t[None, :] < lengths[:, None] if kind == "right" else t[None, :] >= (T - lengths)[:, None]
    if B > 1:
        m[-1] = False  # an all-masked row
    return m
