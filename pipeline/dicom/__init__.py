"""DICOM results: coded classes (:mod:`codes`), Structured Reports of detections (:mod:`sr`), and the reports of a
batch of files from disk (:mod:`files`, ``detflow infer --sr``). Torch-free: the service imports it."""
