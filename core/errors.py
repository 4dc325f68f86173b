"""The errors of ivcache, one hierarchy for every layer.

    IvcacheError
    ├── ImageError
    │   ├── ImageNotFound        the image does not exist, or the caller may not see it
    │   ├── ImageNotActive       the image exists but is not ``active`` (queued, deleted, ...)
    │   ├── ChecksumMismatch     the image's bytes do not match its recorded hash
    │   ├── ImageUnavailable     the image source could not be reached or failed
    │   ├── UnsupportedImage     a disk or container format ivcache does not accept (qed,
    │   │                        luks, ova...), or one the configuration turns away
    │   ├── ImageFormatMismatch  the data's format is not the declared disk_format, or the
    │   │                        data looks like more than one format
    │   ├── UnsafeImage          the data fails a safety check (a qcow2 backing file or data
    │   │                        file, a vmdk extent naming a path, ...)
    │   ├── CorruptImage         the data is not a whole image of its format (truncated...)
    │   ├── ConversionFailed     qemu-img could not convert the image (or hit its limits)
    │   └── NoScratchSpace       image_conversion_dir has no room for the image
    ├── InvalidRequest
    │   ├── InvalidSize          the size asked is too small or not a positive integer
    │   └── InvalidIdentifier    an id that could escape a directory or a pool
    ├── VolumeNotFound           no such volume (or not one the caller may see)
    ├── EntryNotFound            no such cache entry
    ├── StorageError
    │   └── NoSpace              the backend has no room for the volume
    ├── QuotaExceeded            the internal tenant's quota would be exceeded
    ├── AlreadyClaimed           another worker holds the claim on (host, image)
    ├── AuthError                who is calling could not be established, or may not do it
    │   ├── TokenRefused         Keystone refused the caller's token (expired, revoked, ...)
    │   ├── IdentityUnavailable  Keystone could not be reached, or refused ivcache itself
    │   └── Forbidden            the caller may not do this (an operator's command)
    └── ConfigError              a bad configuration option (names the option)

Every message is one line saying what was wrong and, where it helps, what to do.
"""

from __future__ import annotations

__all__ = [
    "AlreadyClaimed",
    "AuthError",
    "ChecksumMismatch",
    "ConfigError",
    "ConversionFailed",
    "CorruptImage",
    "EntryNotFound",
    "Forbidden",
    "IdentityUnavailable",
    "ImageError",
    "ImageFormatMismatch",
    "ImageNotActive",
    "ImageNotFound",
    "ImageUnavailable",
    "InvalidIdentifier",
    "InvalidRequest",
    "InvalidSize",
    "IvcacheError",
    "NoScratchSpace",
    "NoSpace",
    "QuotaExceeded",
    "StorageError",
    "TokenRefused",
    "UnsafeImage",
    "UnsupportedImage",
    "VolumeNotFound",
]


class IvcacheError(Exception):
    """Base of every error ivcache raises on purpose."""


class ImageError(IvcacheError):
    pass


class ImageNotFound(ImageError):
    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id} not found (or not visible to this project)")
        self.image_id = image_id


class ImageNotActive(ImageError):
    def __init__(self, image_id: str, status: str) -> None:
        super().__init__(f"image {image_id} is {status!r}, not 'active': it cannot be used yet")
        self.image_id = image_id
        self.status = status


class ChecksumMismatch(ImageError):
    def __init__(self, image_id: str, algo: str, expected: str, actual: str) -> None:
        super().__init__(
            f"image {image_id}: {algo} of the data is {actual[:16]}..., expected "
            f"{expected[:16]}...: the image is corrupt; re-upload it"
        )
        self.image_id = image_id


class ImageUnavailable(ImageError):
    pass


class UnsupportedImage(ImageError):
    pass


class ImageFormatMismatch(ImageError):
    pass


class UnsafeImage(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class ConversionFailed(ImageError):
    pass


class NoScratchSpace(ImageError):
    pass


class InvalidRequest(IvcacheError):
    pass


class InvalidSize(InvalidRequest):
    pass


class InvalidIdentifier(InvalidRequest):
    def __init__(self, kind: str, value: str) -> None:
        super().__init__(
            f"invalid {kind} id {value!r}: use letters, digits, '-', '_' and '.' only"
        )
        self.value = value


class VolumeNotFound(IvcacheError):
    def __init__(self, volume_id: str) -> None:
        super().__init__(f"volume {volume_id} not found")
        self.volume_id = volume_id


class EntryNotFound(IvcacheError):
    def __init__(self, entry_id: str) -> None:
        super().__init__(f"cache entry {entry_id} not found")
        self.entry_id = entry_id


class StorageError(IvcacheError):
    pass


class NoSpace(StorageError):
    pass


class QuotaExceeded(IvcacheError):
    pass


class AlreadyClaimed(IvcacheError):
    def __init__(self, host: str, image_id: str) -> None:
        super().__init__(f"image {image_id} on host {host} is already being cached")
        self.host = host
        self.image_id = image_id


class AuthError(IvcacheError):
    pass


class TokenRefused(AuthError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"the token was refused by Keystone: {reason}; get a new one")
        self.reason = reason


class IdentityUnavailable(AuthError):
    pass


class Forbidden(AuthError):
    pass


class ConfigError(IvcacheError):
    pass
