"""Local validation: the node's answers compared with the radiologists' reads.

``ich-node audit`` (:func:`ich_node.audit.report.run_audit`) joins a CSV of
reads (one row per study: its truth) to the results ledger (the store's
``series_reads``, one row per series version read, kept for
``storage.keep_results_days``) and writes ``report.json``, ``report.html`` and a
one-screen summary: per-label prevalence, sensitivity, specificity, PPV and NPV
at the thresholds in use (Wilson intervals), ROC AUC (DeLong interval), a
calibration table, the operating point for a target sensitivity, drift per
month, and the time to notification against the report's time. See
docs/validation.md.

Modules: :mod:`~ich_node.audit.reads` (the reads CSV), :mod:`~ich_node.audit.stats`
(the statistics, numpy + SciPy + scikit-learn), :mod:`~ich_node.audit.report`
(the join, the report, the summary), :mod:`~ich_node.audit.html` (report.html with
matplotlib plots). Nothing here imports torch or the model: the audit runs on
any host that can open the store.
"""
