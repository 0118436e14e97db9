"""Delivery of results beyond the DICOM objects: alerts to a RIS, gateways and people.

:mod:`ich_node.delivery.alerts` holds the alert record (a plain, frozen record
made from the findings, written to disk before it is sent); :mod:`.hl7`,
:mod:`.webhook` and :mod:`.email` turn it into a message and send it. None of
them imports torch.
"""
