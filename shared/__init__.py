"""bcast's common package: settings, database models, domain rules and helpers.

Everything the services share lives here. This package never imports from ``services``.
"""
