"""One file per solver: frozen settings plus an ``init``/``step`` pair that the driver runs."""
