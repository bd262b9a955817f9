"""The web app's files: served by the service, shipped in the package, and written so a strict
Content-Security-Policy (`default-src 'self'`) never blocks them."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import httpx
import pytest

FILES = ("index.html", "app.js", "app.css")


def static(name: str) -> str:
    return (resources.files("app.webapp") / "static" / name).read_text()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def test_the_page_has_no_inline_code_or_styles() -> None:
    parser = _Tags()
    parser.feed(static("index.html"))
    for tag, attrs in parser.found:
        assert "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "script":
            assert attrs.get("src", "").startswith("/app/static/")
    assert "<style" not in static("index.html")
    script = static("app.js")
    for unsafe in ("eval(", "new Function", "innerHTML", 'setTimeout("', "document.write"):
        assert unsafe not in script
    # Every form control has a label.
    ids = {a["id"] for t, a in parser.found if t == "input" and a.get("id")}
    labelled = {a["for"] for t, a in parser.found if t == "label" and a.get("for")}
    assert ids
    assert ids <= labelled


@pytest.mark.asyncio(loop_scope="session")
async def test_the_service_serves_the_app_and_its_files(client: httpx.AsyncClient) -> None:
    page = await client.get("/app")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == static("index.html")
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        answer = await client.get(f"/app/static/{name}")
        assert answer.status_code == 200
        assert kind in answer.headers["content-type"]
        assert answer.text == static(name)
    slash = await client.get("/app/?checkout=paid")
    assert slash.status_code == 308
    assert slash.headers["location"] == "/app?checkout=paid"
    assert (await client.get("/app/static/../../settings.py")).status_code == 404


def test_the_wheel_ships_the_app() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"app\.webapp" = \[.*static/\*\.js', text)
    for name in FILES:
        assert static(name)


def test_checkout_returns_to_the_app_unless_told_otherwise() -> None:
    from app.settings import Environment, Settings
    from conftest import ENCRYPTION_KEY, JWT_SECRET

    base: dict[str, object] = {
        "env": Environment.TEST,
        "jwt_secret": JWT_SECRET,
        "encryption_key": ENCRYPTION_KEY,
        "public_url": "https://unblock.example.com/",
    }
    settings = Settings(**base)  # type: ignore[arg-type]
    assert settings.checkout_success_url == "https://unblock.example.com/app?checkout=paid"
    assert settings.checkout_cancel_url == "https://unblock.example.com/app?checkout=cancelled"
    own = Settings(**base, checkout_success_url="https://product.example.com/billing/done")  # type: ignore[arg-type]
    assert own.checkout_success_url == "https://product.example.com/billing/done"
    assert Settings(**base, checkout_cancel_url="").checkout_cancel_url is None  # type: ignore[arg-type]
