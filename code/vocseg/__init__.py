"""DeepLabV3 semantic segmentation on Pascal VOC 2012 (+SBD), run from Python config files."""

__version__ = "0.1.0"
