"""PTransforms and DoFns: parsing, feature extraction, joining, training steps."""
from transforms import _beam_patches

_beam_patches.apply()
