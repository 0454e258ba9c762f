"""Jobs as the service runs them: the one lifecycle (``lifecycle``), a stored spec made
runnable (``materialize``), a finished job's outputs (``results``) and the in-process runner
(``threads``). Nothing here imports fastapi or celery."""
