"""iepnode: a DICOM-native image exchange node."""

__version__ = "0.1.0"
