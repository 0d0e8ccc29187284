"""The STAL network: backbones, residual attention, body parts, STAN, and the assembled model."""

from stal_ray.model.stal import STAL, STALOutput

__all__ = ["STAL", "STALOutput"]
