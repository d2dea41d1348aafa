"""``detflow pacs``: DICOM in, DICOM out. QIDO-RS finds studies, WADO-RS retrieves instances one by one, the ONNX
engine detects, a DICOM SR per series is stored back with STOW-RS; a SQLite ledger makes reruns skip finished series.

:mod:`client` (DICOMweb, credentials, TLS, retries), :mod:`ledger` (SQLite), :mod:`run` (select, infer, write,
store), :mod:`orthanc` (a throwaway local Orthanc for tests and benchmarks).
"""
