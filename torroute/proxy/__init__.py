"""``torroute proxy``: the tor-smtp HELO proxy (see docs/proxy.rst).

:mod:`.settings` (the ``[proxy]`` table and the flags' overrides), :mod:`.session` (the one
asyncio driver of :class:`torroute.protocols.heloproxy.HeloProxy`, for inetd/stdio and for the
listener).
"""
