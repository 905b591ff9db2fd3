"""PTransforms and DoFns: parsing, feature extraction, joining, training steps."""
