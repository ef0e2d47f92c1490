"""Feature caching: the `CacheView` slot models expose, schedules and cachers."""

from .view import CacheView


__all__ = ["CacheView"]
