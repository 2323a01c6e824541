"""MMAR in PyTorch (the only place in the package that imports torch): `MMAR.from_pretrained(DIR)`
on a `mmar-jax convert jax-to-safetensors` output. See model.py."""

from mmar_jax.pytorch.model import MMAR

__all__ = ["MMAR"]
