"""Who is calling: ``KeystoneIdentity`` (``ivcache.adapters.identity.keystone``, imported only
when used: it needs openstacksdk, the ``glance`` extra) turns a Keystone token into a
``RequestContext``."""

__all__: list[str] = []
