"""Secrets out of what we print: a journal URL as it may appear in logs and errors."""

MASK = "***"


def mask_url(url: str) -> str:
    """`url` with the password of its user part replaced by ***, safe for logs and errors.

    Works on text that is not a valid URL too (an unknown scheme, no scheme, a password
    holding an unencoded / or @), since those are the URLs that end up in error messages:
    everything between the user name's `:` and the last `@` of the authority is hidden.
    When in doubt it hides too much, never too little."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not at or not colon or any(c in user for c in "/?#"):
        return url  # no user:password@ before the host (an @ in a path is not one)
    return f"{scheme}{sep}{user}:{MASK}@{host}"
