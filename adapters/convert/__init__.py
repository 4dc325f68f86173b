"""Image formats: detection and safety checks (oslo.utils' format inspector), conversion
to raw (qemu-img under prlimit). ``ImagePipeline`` serves the core's ``ImageConverter``."""

from ivcache.adapters.convert.formats import FormatPolicy
from ivcache.adapters.convert.pipeline import ImagePipeline
from ivcache.adapters.convert.qemu import QemuImg

__all__ = ["FormatPolicy", "ImagePipeline", "QemuImg"]
