"""ich-node: an AI DICOM node that flags intracranial hemorrhage on head CT.

Every result it produces is an AI result for triage support, not a diagnosis.
"""

__version__ = "0.1.0"
