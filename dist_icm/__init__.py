"""dist_icm: a distributed large-batch trainer for Infinite Class Mixup."""

__version__ = "0.1.0"
