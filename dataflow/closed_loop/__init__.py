"""The closed loop (``python -m dataflow.loop``): its child processes (``processes``), the
join of each closed period (``period_join``), the measures of a run (``evaluation``), its
report and plot (``report``) and the join as one streaming job (``stream_join``)."""
