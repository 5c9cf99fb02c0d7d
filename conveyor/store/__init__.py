"""PostgreSQL storage: the asyncpg pools, numbered SQL migrations and the repositories.

Every SQL statement Conveyor runs lives in this package (``sql/`` holds the migrations).
"""
