"""Training: what every model family's training shares, one module per responsibility.

``strategies.py`` (freeze schedules), ``devices.py`` (``train.device``, CPU threads), ``runs.py`` (prepared-data
check, run fingerprint, resumable work folder), ``pretrained.py`` (initial weights per ``train.pretrained``),
``weights_import.py`` (COCO weight transfer by name and shape), ``publish.py`` (a finished run's outputs). The
families' trainers (``pipeline/families/<name>/``) use them; ``stage.py`` is the ``detflow train`` stage. This
package imports none of its modules.
"""
