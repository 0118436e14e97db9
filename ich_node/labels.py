"""The six labels the classifier predicts, in the order of its logits.

The order is part of the model bundle and of ``findings.json``; never reorder it.
"""

from __future__ import annotations

from typing import Final

#: Model output order: ``any`` first, then the five subtypes alphabetically.
LABELS: Final[tuple[str, ...]] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)

#: What people read for each label wherever a coded value is shown with text (the
#: HL7 alert's OBX-3 text): the label itself, even where the code's own meaning says
#: otherwise (intraparenchymal is SNOMED CT 274100004, meaning "Cerebral hemorrhage").
LABEL_NAMES: Final[dict[str, str]] = {
    "any": "Intracranial hemorrhage",
    "epidural": "Epidural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hemorrhage",
}

#: The five hemorrhage subtypes (every label except ``any``).
SUBTYPES: Final[tuple[str, ...]] = LABELS[1:]

#: The order of the six rows per image in RSNA 2019's ``stage_2_train.csv``.
RSNA_ORDER: Final[tuple[str, ...]] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)

#: RSNA 2019 weighted log loss: ``any`` counts double.
RSNA_WEIGHTS: Final[dict[str, float]] = {
    label: (2.0 if label == "any" else 1.0) for label in LABELS
}
