"""A provider simulator of bcast's own, for tests and benchmarks: it speaks the providers'
API shapes on loopback, misbehaves on request, and counts exactly what it received.
"""
