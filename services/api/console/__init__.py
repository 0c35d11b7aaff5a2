"""The operator console: server-rendered pages at ``/console`` over the same domain rules as
the API (``shared.domain``), with a little progressive JavaScript.

Signing in takes an API token once and gives the browser an HttpOnly, SameSite session cookie
(``shared.domain.console_sessions``); every form carries the session's CSRF token back; a
workspace sees only its own data.
"""
