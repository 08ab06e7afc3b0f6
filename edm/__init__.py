"""edm: a daemon that consumes e-mail jobs from RabbitMQ and receives trade fees over ZeroMQ."""

__version__ = "0.1.0"
