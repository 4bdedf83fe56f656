"""Discriminators, one module per design; objectives build the one their method uses."""

from .nad import NoiseAwareDiscriminator
from .time_aware import TimeAwareProjectedDiscriminator

__all__ = ["NoiseAwareDiscriminator", "TimeAwareProjectedDiscriminator"]
