"""Serving (``python -m dataflow.serve``): the feature log it writes (``feature_log``), a
scoring request parsed and its features extracted (``request``), the scorer (``scorer``) and
the HTTP service around it (``http_server``)."""
