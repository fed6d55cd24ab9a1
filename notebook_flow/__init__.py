"""notebook_flow: cached, durable tasks for Jupyter."""
