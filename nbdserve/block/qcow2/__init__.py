"""The qcow2 format driver: v2/v3 images, backing chains, compressed and zero clusters,
allocation with copy-on-write, image creation and snapshot overlays."""

from .create import create_qcow2, qcow2_image_bytes
from .driver import Qcow2Driver
from .header import Qcow2FormatError
from .overlay import add_snapshot_overlay

__all__ = [
    "Qcow2Driver",
    "Qcow2FormatError",
    "add_snapshot_overlay",
    "create_qcow2",
    "qcow2_image_bytes",
]
