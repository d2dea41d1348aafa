"""Evaluation: every statistic detflow reports, and the gate.

``metrics.py`` (COCO mAP through pycocotools, FROC/CPM, the patient bootstrap, case mining: torch-free),
``gate.py`` (the promotion gate), ``plots.py`` (plot data), ``predict.py`` (a checkpoint as a detector, through
its family's backend), ``stage.py`` (the ``detflow evaluate`` stage: score, write every statistic, apply the gate),
``external.py`` (other sites' labelled sets). This package imports none of its modules.
"""
