"""Pipelines, their options and command lines. ``python -m dataflow --help`` lists them."""
