"""Alembic scripts for the job store (a package so that installs ship them)."""
