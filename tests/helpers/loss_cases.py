"""The shapes of the PPO policy / value loss tests."""
from tests.conftest import pick


def shape():
    """(B, T): small under the interpreter (T = 21 → two BLOCK_T = 16 tiles per row), [64, 1024] on CUDA."""
    return pick((6, 21), (64, 1024))
