"""Alembic revision scripts, one per schema change, named NNNN_slug.py."""
