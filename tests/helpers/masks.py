"""Random [B, T] validity masks for the kernel tests: padding on either side, holes, and an all-masked row."""
import torch

MASK_KINDS = ("right", "left", "holes")


def make_mask(B: int, T: int, kind: str = "mixed", device="cpu") -> torch.Tensor:
    """bool [B, T]. kind "right" / "left": padding after / before random lengths in 0..T (row 0 full); "holes": random
    gaps; "mixed": the three kinds over the rows (row b takes kind b mod 3, row 0 full). The last row is all masked."""
    t = torch.arange(T, device=device)
    lengths = torch.randint(0, T + 1, (B,), device=device)
    lengths[0] = T
    layouts = {"right": t[None, :] < lengths[:, None],
               "left": t[None, :] >= (T - lengths)[:, None],
               "holes": torch.rand(B, T, device=device) < 0.6}
    if kind == "mixed":
        row_kind = torch.arange(B, device=device)[:, None] % 3
        m = torch.where(row_kind == 0, layouts["right"], torch.where(row_kind == 1, layouts["left"], layouts["holes"]))
        m[0] = True
    else:
        m = layouts[kind]
    if B > 1:
        m[-1] = False  # an all-masked row
    return m
