"""PTransforms and DoFns: reading logs, feature extraction, the joiner, the training worker
and model, online metrics."""
