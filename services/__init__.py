"""bcast's processes: the HTTP API, the scheduler and the dispatcher, and the CLI that runs them."""
