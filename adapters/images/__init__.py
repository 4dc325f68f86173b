"""Image source adapters: ``LocalImageSource`` (a directory of image files, the embedded
default) and ``GlanceImageSource`` (``ivcache.adapters.images.glance``, imported only when
used: it needs openstacksdk, the ``glance`` extra)."""

from ivcache.adapters.images.local import LocalImageSource

__all__ = ["LocalImageSource"]
