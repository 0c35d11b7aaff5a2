"""The scheduler: claims due broadcasts and hands them to the dispatchers through RabbitMQ."""
