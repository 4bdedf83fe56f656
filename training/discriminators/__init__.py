"""Discriminators, one module per design; objectives build the one their method uses."""

from .time_aware import TimeAwareProjectedDiscriminator

__all__ = ["TimeAwareProjectedDiscriminator"]
