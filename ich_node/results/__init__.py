"""Everything sent back to the PACS, one module per object (the way highdicom is laid out).

- :mod:`~ich_node.results.findings`: typed records of a series' findings, ``findings.json``;
- :mod:`~ich_node.results.sr`: the TID 1500 Comprehensive 3D SR;
- :mod:`~ich_node.results.sc`: Grad-CAM heatmaps as Secondary Capture images;
- :mod:`~ich_node.results.pm`: Grad-CAM values as a Parametric Map;
- :mod:`~ich_node.results.common`: attributes every output shares (patient, study, equipment);
- :mod:`~ich_node.results.build`: all of them for one series, and their files.

This ``__init__`` imports nothing, so that importing the records
(``ich_node.results.findings``) does not import the encoders.
"""
