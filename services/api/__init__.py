"""The thin HTTP API: parse, authorise, call ``shared``, answer. It never talks to RabbitMQ."""
