"""The console walked as an operator would, in a real headless Chromium (Debian's, driven by
Playwright): sign in, see the broadcast list with live progress while a broadcast sends,
filter it, at laptop and phone widths, with screenshots of each page kept as artifacts
(``BCAST_TEST_ARTIFACTS``, default ``test-artifacts/``); a second workspace sees none of it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    Page,
    Playwright,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("BCAST_TEST_ARTIFACTS", "test-artifacts")) / "console"
#: axe-core, the accessibility rules engine, from the npm registry: this version, this digest.
AXE_VERSION = "4.14.1"
AXE_INTEGRITY = "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ=="
AXE_CACHE = Path(__file__).parents[2] / ".cache" / f"axe-core-{AXE_VERSION}"
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    binary = shutil.which("chromium")
    assert binary, "Chromium is missing: bash deploy/local/services.sh installs it"
    browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def axe() -> str:
    """axe-core's script (fetched once with npm, checked against its published digest)."""
    script = AXE_CACHE / "axe.min.js"
    if not script.exists():
        npm = shutil.which("npm")
        assert npm, "npm is missing: it fetches axe-core for the accessibility checks"
        AXE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", str(AXE_CACHE)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        tarball = AXE_CACHE / f"axe-core-{AXE_VERSION}.tgz"
        digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        assert f"sha512-{digest}" == AXE_INTEGRITY, "axe-core's tarball is not the one published"
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/axe.min.js")
            assert member is not None
            script.write_bytes(member.read())
    return script.read_text()


def accessible(page: Page, axe: str) -> None:
    """No serious or critical axe-core violation (WCAG 2.1 A and AA rules) on the page. The
    script is evaluated through the browser's debugging protocol, which the page's
    Content-Security-Policy (no injected scripts) does not govern.
    """
    page.evaluate(axe + "\n;undefined")
    result = page.evaluate(
        "() => axe.run(document, {runOnly: {type: 'tag', values: "
        "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
    )
    bad = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{page.url}: {bad}"


def new_page(chromium: Browser, system: System, size: ViewportSize = LAPTOP) -> Page:
    # The pages' own Content-Security-Policy applies: what the tests see works under it.
    context = chromium.new_context(base_url=system.api_url, viewport=size)
    return context.new_page()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def sign_in(page: Page, token: str) -> None:
    page.goto("/console")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Broadcasts")).to_be_visible()


def sending_setup(api: Api, n: int, rate: float, **sim: Any) -> tuple[dict[str, Any], int]:
    channel, _ = api.webhook_channel(rate=rate, **sim)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"c-{i}" for i in range(n)])
    return channel, account["id"]


def test_an_operator_signs_in_and_watches_the_list(
    chromium: Browser, system: System, api: Api, axe: str
) -> None:
    other = system.client()
    their_channel, _ = sending_setup(other, 3, 100)
    other.broadcast(
        their_channel["id"],
        {},
        name="their private launch",
        send_at=(datetime.now(UTC) + timedelta(days=2)).isoformat(),
    )

    # 15 s of sending: progress to watch; two recipients the provider does not know.
    channel, _ = sending_setup(api, 600, 40, fail_addresses=["c-1", "c-2"])
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    api.broadcast(channel["id"], {}, name="tomorrow's digest", send_at=later)
    live = api.broadcast(channel["id"], {}, name="flash sale")

    page = new_page(chromium, system)
    transferred: list[int] = []
    page.on("response", lambda r: transferred.append(len(r.body()) if r.ok else 0))

    # A wrong token is refused with the reason, then the right one signs in.
    page.goto("/console")
    page.get_by_label("API token").fill("bcast_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That token is unknown, revoked or expired.")
    shot(page, "login-refused")
    accessible(page, axe)
    transferred.clear()
    page.get_by_label("API token").fill(api.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Broadcasts")).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert sum(transferred) < 100_000, f"the list page took {sum(transferred)} bytes"

    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(page.get_by_text("their private launch")).to_have_count(0)
    row = page.locator(f'tr[data-broadcast="{live["id"]}"]')
    sent = row.locator('[data-field="sent"]')
    # Live progress: the sent count moves without a reload.
    api.wait_status(live["id"], "in_progress", timeout=30)
    first = int(
        wait_for(
            "a first send in the row",
            lambda: int(sent.inner_text() or 0) > 0 and sent.inner_text(),
            timeout=30,
        )
    )
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    wait_for("the row's count to move", lambda: int(sent.inner_text()) > first, timeout=30)
    assert navigations == [], "progress came without reloading the page"
    shot(page, "broadcasts-sending")
    accessible(page, axe)

    # Filter by status: pending only, then pending and in progress.
    page.get_by_label("Pending").check()
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("tomorrow's digest")
    page.get_by_label("In progress").check()
    page.get_by_label("Completed").check()
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(2)
    page.get_by_label("Name contains").fill("flash")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    shot(page, "broadcasts-filtered")

    # The same list at a phone's width.
    phone = new_page(chromium, system, PHONE)
    sign_in(phone, api.token)
    expect(phone.get_by_text("flash sale")).to_be_visible()
    shot(phone, "broadcasts-phone")
    accessible(phone, axe)

    # Signing out ends the session: the list sends the browser to sign in again.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto("/console/broadcasts")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    # The other workspace signs in and sees only its own broadcast.
    theirs = new_page(chromium, system)
    sign_in(theirs, other.token)
    expect(theirs.locator("tbody tr")).to_have_count(1)
    expect(theirs.get_by_text("their private launch")).to_be_visible()
    expect(theirs.get_by_text("flash sale")).to_have_count(0)
    shot(theirs, "broadcasts-other-workspace")

    # The detail of the sending broadcast: pause stops it, resume goes on, the recipients
    # not reached are listed with the provider's reason and downloadable.
    detail = new_page(chromium, system)
    sign_in(detail, api.token)
    detail.get_by_role("link", name="flash sale").click()
    expect(detail.get_by_role("heading", name="flash sale")).to_be_visible()
    detail.get_by_role("button", name="Pause").click()
    expect(detail.locator('[data-field="status"]')).to_have_text("Paused")
    expect(detail.get_by_role("button", name="Resume")).to_be_visible()
    expect(detail.get_by_role("button", name="Pause")).to_have_count(0)
    assert api.get(live["id"])["status"] == "paused", "the console paused it, as the API sees"
    shot(detail, "detail-paused")
    accessible(detail, axe)
    detail.get_by_role("button", name="Resume").click()
    sent_now = detail.locator('dd[data-field="sent"]')
    before = int(sent_now.inner_text())
    wait_for("progress after resuming", lambda: int(sent_now.inner_text()) > before, timeout=30)
    api.wait_status(live["id"], "completed", timeout=60)
    detail.reload()
    expect(detail.locator("table").first).to_contain_text("no such recipient")
    expect(detail.get_by_role("cell", name="c-1", exact=True)).to_be_visible()
    with detail.expect_download() as download:
        detail.get_by_role("link", name="Download CSV").click()
    text = Path(download.value.path()).read_text()
    assert text.splitlines()[0].startswith("contact_id,name,address,status")
    assert {line.split(",")[2] for line in text.strip().splitlines()[1:]} == {"c-1", "c-2"}
    shot(detail, "detail-completed")
    accessible(detail, axe)

    # The scheduled one: edited, then canceled.
    detail.get_by_role("link", name="Broadcasts", exact=True).click()
    detail.get_by_role("link", name="tomorrow's digest").click()
    detail.get_by_role("link", name="Edit").click()
    detail.get_by_label("Name", exact=True).fill("Friday's digest")
    detail.get_by_role("button", name="Save").click()
    expect(detail.get_by_role("heading", name="Friday's digest")).to_be_visible()
    shot(detail, "detail-scheduled")
    accessible(detail, axe)
    detail.get_by_role("button", name="Cancel").click()
    expect(detail.locator('[data-field="status"]')).to_have_text("Canceled")
    expect(detail.get_by_role("link", name="Edit")).to_have_count(0)
    expect(detail.get_by_role("button", name="Resume")).to_have_count(0)


def test_a_timed_send_from_a_conversation_in_the_operator_s_time_zone(
    chromium: Browser, system: System, api: Api, axe: str
) -> None:
    _, account_id = sending_setup(api, 1, 100)
    contact_id = api.contacts(account_id)["c-0"]
    conversation = api.ok(
        "POST", "/v1/conversations", 201, json={"account_id": account_id, "contact_id": contact_id}
    )
    # The operator's browser is in Tokyo.
    context = chromium.new_context(
        base_url=system.api_url, viewport=LAPTOP, timezone_id="Asia/Tokyo"
    )
    page = context.new_page()
    sign_in(page, api.token)
    page.get_by_role("link", name="Conversations").click()
    page.get_by_role("link", name="N c-0").click()
    expect(page.get_by_role("heading", name="Timed Send", exact=True)).to_be_visible()
    expect(page.locator("[data-timezone-name]")).to_have_text("Asia/Tokyo")
    tokyo = ZoneInfo("Asia/Tokyo")

    def schedule(minutes: int) -> str:
        at = (datetime.now(tokyo) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M")
        page.get_by_label("Message").fill("your order is ready")
        page.get_by_label("At a time").check()
        page.get_by_label(re.compile("^Send time")).fill(at)
        page.get_by_role("button", name="Schedule").click()
        return at

    schedule(4)
    expect(page.get_by_role("alert")).to_contain_text(
        "a scheduled send must be at least 5 minutes ahead"
    )
    shot(page, "timed-send-refused")
    accessible(page, axe)
    at = schedule(45)
    expect(page.get_by_role("status")).to_contain_text("Scheduled for")
    [made] = api.ok("GET", f"/v1/conversations/{conversation['id']}/timed-sends")["items"]
    sent_at = datetime.fromisoformat(made["send_at"])
    assert sent_at == datetime.fromisoformat(at).replace(tzinfo=tokyo).astimezone(UTC)
    shot(page, "timed-send-scheduled")
    # It shows in the broadcast list, as a timed send.
    page.get_by_role("link", name="Broadcasts").click()
    page.get_by_label("Origin").select_option("conversation")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr").first).to_contain_text("Timed send")
    context.close()


def test_an_operator_picks_people_and_creates_a_broadcast(
    chromium: Browser, system: System, api: Api, axe: str
) -> None:
    channel, hook = api.webhook_channel(rate=200)
    account_id = api.account(channel["id"])["id"]
    api.import_contacts(account_id, ["v-1", "v-2", "v-3"], tags=["vip"])
    api.import_contacts(account_id, ["o-1", "o-2"], tags=["other"])
    page = new_page(chromium, system)
    sign_in(page, api.token)
    page.get_by_role("link", name="New broadcast").click()
    expect(page.locator("[data-count]")).to_have_text("5")
    # The count follows the filter as it changes, without a page load.
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.get_by_label("Tags", exact=True).select_option(label="vip")
    expect(page.locator("[data-count]")).to_have_text("3")
    assert navigations == []
    # Until the list is brought up to date, nothing can be created with the old filter.
    expect(page.get_by_role("button", name="Create broadcast")).to_be_disabled()
    page.get_by_role("button", name="Select people").click()
    expect(page.get_by_role("button", name="Create broadcast")).to_be_enabled()
    expect(page.locator("[data-count]")).to_have_text("3")
    expect(page.locator('input[name="contact"]')).to_have_count(3)
    page.get_by_label("N v-2").uncheck()  # everyone matching but one
    page.get_by_label("Name", exact=True).fill("vip preview")
    page.get_by_label("Message").fill("members first")
    # Too soon is refused with the API's words; what was typed stays.
    page.get_by_label("At a time").check()
    soon = (datetime.now(UTC) + timedelta(minutes=4)).astimezone()
    page.get_by_label(re.compile("^Send time")).fill(soon.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="Create broadcast").click()
    expect(page.get_by_role("alert")).to_contain_text("at least 5 minutes ahead")
    expect(page.get_by_label("Message")).to_have_value("members first")
    expect(page.get_by_label("N v-2")).not_to_be_checked()
    shot(page, "new-refused")
    accessible(page, axe)
    # Three images, previewed in the order they will go out; one moved earlier, one left out.
    pictures = []
    for name, color in (("second.png", "blue"), ("first.png", "red"), ("spare.png", "green")):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buf, "PNG")
        pictures.append({"name": name, "mimeType": "image/png", "buffer": buf.getvalue()})
    page.get_by_label(re.compile("^Images")).set_input_files(pictures)  # type: ignore[arg-type]
    previews = page.get_by_role("list", name="Chosen images, in sending order").get_by_role("img")
    expect(previews).to_have_count(3)
    expect(previews.first).to_have_attribute("alt", "1: second.png")
    page.get_by_role("button", name="Move earlier: first.png").click()
    expect(page.get_by_role("button", name="Move later: first.png")).to_be_focused()
    page.get_by_role("button", name="Remove: spare.png").click()
    expect(previews).to_have_count(2)
    expect(previews.first).to_have_attribute("alt", "1: first.png")
    expect(previews.last).to_have_attribute("alt", "2: second.png")
    shot(page, "new-with-images")
    accessible(page, axe)
    page.get_by_label("Now").check()
    page.get_by_role("button", name="Create broadcast").click()
    expect(page.get_by_role("heading", name="vip preview")).to_be_visible()
    broadcast_id = int(page.url.rsplit("/", 1)[1])
    done = api.wait_status(broadcast_id, "completed", timeout=60)
    assert done["counts"]["sent"] == 2
    reached = {r["to"] for r in api.sim_requests(hook)}
    assert reached == {"v-1", "v-3"}
    media = api.get(broadcast_id)["content"]["media_ids"]
    names = [api.ok("GET", f"/v1/media/{m}")["filename"] for m in media]
    assert names == ["first.png", "second.png"], "sent in the order the operator left them"
    shot(page, "new-created")
    # And a scheduled one, an hour ahead in the browser's time zone.
    page.get_by_role("link", name="Broadcasts", exact=True).click()
    page.get_by_role("link", name="New broadcast").click()
    page.get_by_label("Name", exact=True).fill("vip reminder")
    page.get_by_label("Message").fill("tomorrow")
    page.get_by_label("At a time").check()
    later = datetime.now(UTC).astimezone() + timedelta(hours=1)
    page.get_by_label(re.compile("^Send time")).fill(later.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="Create broadcast").click()
    expect(page.get_by_role("heading", name="vip reminder")).to_be_visible()
    expect(page.locator('[data-field="status"]')).to_have_text("Pending")


def test_signing_in_works_from_the_keyboard(chromium: Browser, system: System, api: Api) -> None:
    page = new_page(chromium, system)
    page.goto("/console/login")
    page.keyboard.press("Tab")  # the skip link first
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(api.token)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Broadcasts")).to_be_visible()


def test_contacts_import_and_channels_pages(
    chromium: Browser, system: System, api: Api, axe: str, tmp_path: Path
) -> None:
    channel, _ = api.webhook_channel(rate=50)
    account_id = api.account(channel["id"])["id"]
    page = new_page(chromium, system)
    sign_in(page, api.token)
    page.get_by_role("link", name="Contacts").click()
    expect(page.get_by_role("heading", name="Contacts", exact=True)).to_be_visible()
    bad = tmp_path / "bad.csv"
    bad.write_text(f"account_id,address,name,tags,opted_out\n{account_id},,Nobody,,false\n")
    page.get_by_label("CSV file").set_input_files(bad)
    page.get_by_role("button", name="Import").click()
    expect(page.get_by_role("alert")).to_contain_text("Nothing was imported")
    shot(page, "contacts-refused")
    accessible(page, axe)
    good = tmp_path / "good.csv"
    good.write_text(
        "account_id,address,name,tags,opted_out\n"
        f"{account_id},k-1,Kim,team,false\n{account_id},k-2,Lee,team,false\n"
    )
    page.get_by_label("CSV file").set_input_files(good)
    page.get_by_role("button", name="Import").click()
    expect(page.get_by_role("status")).to_have_text("Imported 2 rows: 2 new contacts, 0 updated.")
    expect(page.get_by_role("cell", name="Kim", exact=True)).to_be_visible()
    shot(page, "contacts")
    accessible(page, axe)
    page.get_by_role("link", name="Channels").click()
    expect(page.get_by_role("cell", name=channel["name"], exact=True)).to_be_visible()
    shot(page, "channels")
    accessible(page, axe)


#: The innermost elements reaching past the page's right edge (what makes it scroll sideways).
WIDER_THAN_THE_PAGE = """() => {
  const edge = document.documentElement.clientWidth;
  return Array.from(document.querySelectorAll("body *"))
    .filter(e => e.getBoundingClientRect().right > edge + 0.5)
    .filter(e => !Array.from(e.children).some(c => c.getBoundingClientRect().right > edge + 0.5))
    .slice(0, 5)
    .map(e => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.className ? "." + e.className : ""));
}"""


def test_every_page_fits_a_phone(chromium: Browser, system: System, api: Api, axe: str) -> None:
    """At a phone's width no page scrolls sideways, and each still passes the checks."""
    channel, account_id = sending_setup(api, 3, 100)
    contact_id = api.contacts(account_id)["c-0"]
    conversation = api.ok(
        "POST", "/v1/conversations", 201, json={"account_id": account_id, "contact_id": contact_id}
    )
    later = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    broadcast = api.broadcast(
        channel["id"],
        {"account_ids": [account_id], "selection": "all"},
        name="a long broadcast name that has to wrap on a narrow screen somewhere",
        send_at=later,
    )
    api.ok("POST", "/v1/tags", 201, json={"name": "a-rather-long-tag-name-for-phones"})
    phone = new_page(chromium, system, PHONE)
    phone.goto("/console/login")
    shot(phone, "login-phone")
    sign_in(phone, api.token)
    pages = {
        "broadcasts": "/console/broadcasts",
        "new": f"/console/broadcasts/new?channel={channel['id']}",
        "detail": f"/console/broadcasts/{broadcast['id']}",
        "edit": f"/console/broadcasts/{broadcast['id']}/edit",
        "conversations": "/console/conversations",
        "conversation": f"/console/conversations/{conversation['id']}",
        "contacts": "/console/contacts",
        "channels": "/console/channels",
    }
    for name, path in pages.items():
        phone.goto(path)
        expect(phone.get_by_role("heading", level=1)).to_be_visible()
        overflow = phone.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        wide = phone.evaluate(WIDER_THAN_THE_PAGE)
        assert overflow <= 0, f"{name} scrolls sideways by {overflow} px: {wide}"
        shot(phone, f"{name}-phone")
        accessible(phone, axe)
