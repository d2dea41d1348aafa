"""The contracts between stages: torch-free value types and schemas that one stage writes and another reads.

Bottom of the layer stack (see ARCHITECTURE.md): these modules import only the standard library, numpy, pydantic
and :mod:`pipeline.errors`, so the training side, the ONNX engine and the serving image agree on one definition of
each artifact without importing one another.

* :mod:`~pipeline.contracts.checkpoint`: the detflow header every training checkpoint carries;
* :mod:`~pipeline.contracts.card`: the model card (``model_card.json``) as one typed schema;
* :mod:`~pipeline.contracts.detections`: detections in image pixels and the letterbox mapping;
* :mod:`~pipeline.contracts.embedding`: the embedding output every exported graph adds (shift detection);
* :mod:`~pipeline.contracts.results`: what training returns (the run and where its initial weights came from).

This package imports none of its modules: import the one you need.
"""
