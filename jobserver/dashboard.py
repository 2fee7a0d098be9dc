"""The dashboard page: `GET /` and its few static files, served from jobserver/static.

The page is static (no token needed to load it); its script calls the API with the
token the user typed, kept in the tab's sessionStorage. It is a Blueprint of its own
beside the API's, under the same url_prefix, so the API's hooks (its turn gate and
the token check) do not apply to files that hold no data.

Every answer carries a strict Content-Security-Policy (no inline script or style, no
other origin), `nosniff`, and `Cache-Control: no-cache` with an ETag: a browser keeps
its copy but asks each time, so a new version loads at the next visit.
"""
import hashlib
from importlib import resources

from flask import Blueprint, current_app, request
from werkzeug.exceptions import NotFound

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {  # name under /ui/ -> content type; nothing else is served
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGE = "index.html"
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Files:
    """The static files, read once from the package and kept with their ETags."""

    def __init__(self):
        self._cache = {}

    def get(self, name):
        found = self._cache.get(name)
        if found is None:
            data = resources.files("jobserver").joinpath("static", name).read_bytes()
            found = self._cache[name] = (data, hashlib.sha256(data).hexdigest()[:20])
        return found


def blueprint(name="jobserver_dashboard"):
    """The page at `/` and its files at `/ui/<name>`."""
    files = _Files()
    bp = Blueprint(name, __name__)

    def serve(filename, content_type):
        data, etag = files.get(filename)
        response = current_app.response_class(data, content_type=content_type)
        response.set_etag(etag)
        response.headers.update(_HEADERS)
        return response.make_conditional(request)

    def page():
        return serve(PAGE, "text/html; charset=utf-8")

    def asset(filename):
        content_type = ASSETS.get(filename)
        if content_type is None:
            raise NotFound(f"no dashboard file {filename!r}")
        return serve(filename, content_type)

    bp.add_url_rule("/", "page", page, methods=["GET"])
    bp.add_url_rule("/ui/<filename>", "asset", asset, methods=["GET"])
    return bp


def attach(api_bp):
    """Serve the dashboard wherever the API blueprint `api_bp` is registered, under its prefix."""
    api_bp.record_once(lambda state: state.app.register_blueprint(
        blueprint(f"{api_bp.name}_dashboard"), url_prefix=state.url_prefix))
