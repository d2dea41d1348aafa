"""Data stage: phantom generator, format readers, validation, de-duplication, patient split, writer."""
