"""Prefect flows that compose the pipeline's stages. No domain logic lives here."""
