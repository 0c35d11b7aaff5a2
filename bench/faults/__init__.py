"""The fault suite (``python -m bench.faults``): broadcasts sent end to end by real processes
while a dispatcher is killed, RabbitMQ or Postgres restarts, the provider goes down or
throttles, schedulers die or race, and everything is told to stop. See docs/faults.md.
"""
