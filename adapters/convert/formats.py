"""What an image's data is, and whether it is let through: the one place that refuses.

Detection is oslo.utils' ``format_inspector`` (``InspectWrapper``, fed the chunks as they
stream past, and the detected format's own ``safety_check``); ivcache parses no format
itself. On top of the inspector, the rules of Cinder (and of Glance, which made them):

- accepted: raw, qcow2, vmdk, vhd, vhdx, vdi, and iso (written as raw); a raw disk with an
  MBR or GPT partition table is detected as ``gpt`` and is raw; a bootable ISO detected as
  both iso and gpt is an ISO. Anything else is refused: qed (never safe), luks, ...
- the data decides, not the label: a declared ``disk_format`` other than the detected one
  is refused (CVE-2024-32498), and so is data that looks like more than one format;
- every safety check of the detected format must pass (qcow2: no backing file, no data
  file, no unknown incompatible features; vmdk: a sparse create-type, extents naming no
  path, a sound footer; gpt: a sane MBR), and a vmdk's create-type must be one of
  ``vmdk_allowed_types``;
- ``container_format`` is ``bare``, or ``compressed`` holding gzip data when
  ``allow_compression_on_image_upload`` is set; ``image_conversion_disable`` refuses what
  would need qemu-img.

Each refusal is one line: what was wrong and what to do.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

from ivcache.core.errors import (
    CorruptImage,
    ImageFormatMismatch,
    UnsafeImage,
    UnsupportedImage,
)
from ivcache.core.model import Image

# oslo.utils' inspectors are imported where they are used: importing them compiles the many
# patterns of oslo_utils.strutils (0.1 to 0.3 s here), which every CLI command that reads no
# image (a hit, a listing) would pay at start.
if TYPE_CHECKING:
    from oslo_utils.imageutils import format_inspector as fi

__all__ = [
    "ACCEPTED",
    "AS_IS",
    "CONTAINERS",
    "FormatPolicy",
    "Verdict",
    "check_declared",
    "decide",
    "gunzip",
    "inspect",
    "judge",
]

#: the disk formats taken (Glance's names), and how qemu-img names them (``-f``)
ACCEPTED: dict[str, str] = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc",
                            "vhdx": "vhdx", "vdi": "vdi", "iso": "raw"}
#: formats whose bytes are the disk's bytes: written into the volume as they stream
AS_IS = frozenset({"raw", "iso"})
CONTAINERS = ("bare", "compressed")
_NEVER = {"qed": "qed images are never accepted (the format cannot be checked safely)",
          "luks": "encrypted (luks) images are not supported"}
_GZIP_MAGIC = b"\x1f\x8b"
_GUNZIP_PIECE = 4 << 20  # the most decompressed bytes one input chunk yields at once


@attrs.frozen
class FormatPolicy:
    """What the configuration lets through (Cinder's options of the same names)."""

    conversion_disabled: bool = False  # image_conversion_disable
    allow_compressed: bool = False  # allow_compression_on_image_upload
    vmdk_allowed_types: tuple[str, ...] = ("streamOptimized", "monolithicSparse")


@attrs.frozen
class Verdict:
    """What the data is: its format (Glance's name) and, unless its bytes are the disk's,
    the virtual size its header gives."""

    format: str
    virtual_size: int | None

    @property
    def as_is(self) -> bool:
        return self.format in AS_IS

    @property
    def qemu_format(self) -> str:
        return ACCEPTED[self.format]


def check_declared(image: Image, policy: FormatPolicy) -> None:
    """The refusals that the image's metadata alone decides, before a byte is read."""
    what = f"image {image.id}"
    container = image.container_format
    if container not in CONTAINERS:
        raise UnsupportedImage(
            f"{what}: container_format {container!r} is not supported: upload the disk "
            "itself (bare), or gzip-compressed (compressed)")
    if container == "compressed" and not policy.allow_compressed:
        raise UnsupportedImage(
            f"{what} is compressed (container_format = compressed): set "
            "allow_compression_on_image_upload = true to accept it")
    _check_supported(what, image.disk_format)
    _check_conversion(what, image.disk_format, policy)


def _check_supported(what: str, fmt: str) -> None:
    if fmt in _NEVER:
        raise UnsupportedImage(f"{what} is {fmt}: {_NEVER[fmt]}; convert it to qcow2 or raw")
    if fmt not in ACCEPTED:
        raise UnsupportedImage(f"{what}: disk_format {fmt!r} is not supported; use one of "
                               f"{', '.join(ACCEPTED)}")


def _check_conversion(what: str, fmt: str, policy: FormatPolicy) -> None:
    if policy.conversion_disabled and fmt not in AS_IS:
        raise UnsupportedImage(
            f"{what} is {fmt} and image_conversion_disable = true: upload it as raw, or "
            "let ivcache convert it")


def inspect(chunks: Iterator[bytes]) -> fi.InspectWrapper:
    """``chunks`` with every known inspector looking at them as they pass."""
    from oslo_utils.imageutils import format_inspector as fi

    _quiet_inspector()
    return fi.InspectWrapper(chunks)  # type: ignore[arg-type]  # takes any iterator


@functools.cache
def _quiet_inspector() -> None:
    # The inspector logs each failed check as a warning; the refusal says it once, in one
    # line. A handler of its own keeps Python's last-resort stderr handler away from it
    # when the application set up no logging; configured handlers still get its records.
    from oslo_utils.imageutils import format_inspector as fi

    logging.getLogger(fi.__name__).addHandler(logging.NullHandler())


def decide(wrapper: fi.InspectWrapper) -> list[fi.FileInspector] | None:
    """The formats the data so far matches, or None while that cannot be told yet."""
    from oslo_utils.imageutils import format_inspector as fi

    try:
        return wrapper.formats
    except (AttributeError, ValueError, fi.ImageFormatError):
        # An inspector that stumbled on data it half-recognised (a vmdk-like text header,
        # say) cannot tell yet; at the end of the data judge() says what it is.
        return None


def judge(what: str, declared: str | None, formats: list[fi.FileInspector] | None,
          policy: FormatPolicy) -> Verdict:
    """Say what the data is, or refuse it: the rules of the module's docstring.

    ``what`` names the image in messages ("image ID", "image file PATH"); ``declared`` is
    its disk_format (None: whatever the data is). ``formats`` are the detected ones
    (``decide``); their safety checks run here, so call it once the data needed is read.
    """
    from oslo_utils.imageutils import format_inspector as fi

    if formats is None or not formats:
        raise CorruptImage(f"{what}: its format cannot be told from its data: it is damaged "
                           "or not a disk image")
    by_name = {str(i): i for i in formats}
    if by_name.keys() == {"iso", "gpt"}:
        inspector = by_name["iso"]  # a bootable ISO carries a GPT for its boot loader
    elif len(by_name) > 1:
        raise ImageFormatMismatch(
            f"{what}: its data looks like more than one format ({', '.join(sorted(by_name))})"
            ": refused, as one format hidden in another would be")
    else:
        inspector = formats[0]
    detected = str(inspector)
    fmt = "raw" if detected == "gpt" else detected  # a raw disk with a partition table
    _check_supported(what, fmt)
    if declared is not None and declared != fmt:
        raise ImageFormatMismatch(
            f"{what} claims to be {declared} but its data is {fmt}: refused; set its "
            f"disk_format to {fmt} if the data is right")
    _check_conversion(what, fmt, policy)
    if fmt == "vmdk":
        _check_vmdk_type(what, inspector, policy)
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        reasons = "; ".join(str(failure) for failure in exc.failures.values())
        raise UnsafeImage(f"{what} fails the {fmt} safety checks ({reasons}): refused; "
                          "upload a self-contained image") from None
    except fi.ImageFormatError as exc:
        raise CorruptImage(f"{what}: its {fmt} data cannot be checked ({exc}): it is "
                           "damaged or cut short") from None
    virtual = None if fmt in AS_IS else inspector.virtual_size or None
    return Verdict(fmt, virtual)


def _check_vmdk_type(what: str, inspector: fi.FileInspector, policy: FormatPolicy) -> None:
    # The inspector lower-cases the descriptor it read the create-type from.
    create_type = getattr(inspector, "vmdktype", None) or "unknown"
    allowed = {t.lower() for t in policy.vmdk_allowed_types}
    if create_type not in allowed:
        raise UnsafeImage(
            f"{what} is a vmdk of create-type {create_type}, not one of vmdk_allowed_types "
            f"({', '.join(policy.vmdk_allowed_types)}): refused; convert it to "
            "streamOptimized or monolithicSparse")


def gunzip(what: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress gzip data as it streams (``container_format = compressed``); several
    gzip members one after the other are one stream, as gzip(1) reads them."""
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    first = True
    try:
        for chunk in chunks:
            if first and chunk:
                first = False
                if not chunk.startswith(_GZIP_MAGIC[:len(chunk)]):
                    raise UnsupportedImage(
                        f"{what} is compressed but its data is not gzip: only gzip is "
                        "supported; upload it as a bare image")
            data = chunk
            while True:
                out = inflater.decompress(data, _GUNZIP_PIECE)
                if out:
                    yield out
                if inflater.eof:
                    data = inflater.unused_data
                    if not data:
                        break
                    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
                    continue
                data = inflater.unconsumed_tail
                # A full piece may leave output pending inside zlib with no input left.
                if not data and len(out) < _GUNZIP_PIECE:
                    break
        if not inflater.eof:
            raise CorruptImage(f"{what}: its gzip data is cut short: upload it again")
    except zlib.error as exc:
        raise CorruptImage(f"{what}: its gzip data is corrupt ({exc}): upload it "
                           "again") from None
