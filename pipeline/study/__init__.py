"""``detflow study``: the transfer-learning question (which recipe, at which data size, from which initialisation)
answered on the user's own data.

- :mod:`pipeline.study.plan`: the ``study`` params checked (one line per problem) and turned into arms, each a set
  of ``--set`` / ``dvc exp run -S`` overrides (:func:`~pipeline.study.plan.study_arms`: the seam a cluster runner
  maps over);
- :mod:`pipeline.study.queue`: every arm as a DVC experiment, queued with ``dvc exp run --queue`` and run by
  ``dvc queue start``; done arms are skipped, failed or interrupted ones queued again;
- :mod:`pipeline.study.results`: the arms' test predictions read back from DVC, paired patient-bootstrap
  comparisons, learning curves and the recommendation (``reports/study/results.json``);
- the page (the run report's Study section and ``reports/study/report.html``) and its learning-curve chart are
  :mod:`pipeline.report.study`'s: the report package owns every page, and reads results.json, computing nothing.
"""
