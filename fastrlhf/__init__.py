"""fastrlhf: the InstructGPT recipe (SFT -> reward model -> PPO), fast on one GPU node."""
import os as _os

__version__ = "0.1.0"

# In a source checkout ``kernels/`` sits beside ``fastrlhf/``; setup.py installs it as ``fastrlhf.kernels``. When the
# package is imported straight from the checkout (running from the repo root shadows an editable install), let the
# submodule search also look in the checkout root so that ``fastrlhf.kernels`` resolves to that same folder.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - package __path__
