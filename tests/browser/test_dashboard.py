"""The dashboard in a real headless Chromium against the real farm: real workers, Redis and SQL.

A user uploads a manifest through the Upload page, previews it, submits it, watches the batches list fill up
by live polling, opens the batch and its winners, opens a candidate; cancels a running batch; and gets the
errors of a bad manifest next to the field they concern. Screenshots of every step go to
test-artifacts/browser/.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from farm import dispatch
from farm.db import Batch, Candidate, session_scope
from farm.states import CANDIDATE_FINAL

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

UPLOAD = """\
version: 1
name: browser-upload
model: tiny
tags: [browser]
defaults: {candidates: 3, steps: 2, size: 64x64, seed: 21}
items:
  - "a red fox in the snow"
  - prompt: "a lighthouse at dusk"
    size: 64x96
  - template: "a {animal} astronaut"
    vars: {animal: [cat, dog]}
selection: {winners: 1}
"""

BAD = """\
version: 1
name: browser-bad
model: tiny
defaults: {candidates: 3, steps: 2, size: 64x64}
items:
  - "a red fox in the snow"
  - prompt: "a lighthouse at dusk"
    size: 64x
  - prompt: "a harbour"
    candidates: -2
"""

BATCH_DONE_S = 300

# True once every <img> matched by the selector has loaded with a real picture.
IMAGES_LOADED = """(sel) => {
  const imgs = Array.from(document.querySelectorAll(sel));
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def _batch_count(settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Batch)) or 0


def _wait_images(page, selector: str) -> None:
    for img in page.locator(selector).all():
        img.scroll_into_view_if_needed()  # they are loading="lazy"
    page.wait_for_function(IMAGES_LOADED, arg=selector, timeout=30_000)
    widths = page.eval_on_selector_all(selector, "(imgs) => imgs.map((i) => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths


def test_upload_watch_progress_open_batch_winners_and_candidate(page, shot, live_server, settings):
    base = live_server.url
    page.goto(f"{base}/upload")
    shot("upload-empty")
    page.fill("#manifest_text", UPLOAD)
    page.click("button[value=preview]")
    preview = page.locator("#preview")
    preview.wait_for()
    assert preview.locator("[data-field=items]").inner_text() == "4"
    assert preview.locator("[data-field=candidates]").inner_text() == "12"
    assert "nothing was written or queued" in preview.inner_text()
    shot("preview")

    before = _batch_count(settings)
    page.click("button[value=submit]")
    page.wait_for_url(f"{base}/batches/*")
    batch_id = page.url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    assert _batch_count(settings) == before + 1
    assert "Submitted 4 items, 12 candidates." in page.locator(".flash").inner_text()
    shot("submitted")

    # The batches list: the row's bar and status are updated in place by polling the API, not by reloads.
    page.goto(f"{base}/")
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    row.wait_for()
    page.evaluate("window.__notReloaded = true")
    first = row.locator("[data-field=bar]").evaluate("(b) => [b.value, b.max]")
    shot("list-running")
    page.wait_for_function(
        """(id) => {
          const row = document.querySelector(`tr[data-batch-id="${id}"]`);
          const bar = row.querySelector('[data-field="bar"]');
          return bar.max === 12 && bar.value === bar.max
                 && row.querySelector('[data-field="status"]').textContent === "done";
        }""",
        arg=batch_id, timeout=BATCH_DONE_S * 1000, polling=250,
    )
    assert page.evaluate("window.__notReloaded === true"), "the list reloaded instead of updating in place"
    assert row.locator("[data-field=done]").inner_text() == "12 / 12"
    assert row.locator("[data-field=finished]").inner_text() != "–"
    shot("list-done")
    print(f"bar at first sight: {first[0]} / {first[1]}")

    # The batch page: every item done, winner thumbnails load, contact sheet and score plot are real images.
    row.locator("a").first.click()
    page.wait_for_url(f"{base}/batches/{batch_id}")
    assert page.locator("#batch-status").inner_text() == "done"
    bar = page.locator("#batch-bar").evaluate("(b) => [b.value, b.max]")
    assert bar == [12, 12]
    assert page.locator("tr.item").count() == 4
    _wait_images(page, "tr.item img.thumb")
    _wait_images(page, ".pictures img")
    shot("batch-done")

    # Expand the first item: its candidates as a grid with verdict badges.
    page.locator("tr.candidates-row details summary").first.click()
    grid = page.locator("tr.candidates-row details[open] .grid").first
    grid.wait_for()
    assert grid.locator(".tile").count() == 3
    _wait_images(page, "tr.candidates-row details[open] .tile img")
    shot("batch-item-expanded")

    # A candidate: the full image, recipe, moderation verdicts, timings.
    winner = page.locator("tr.item img.thumb").first
    winner.click()
    page.wait_for_url(f"{base}/candidates/*")
    _wait_images(page, "img.full")
    body = page.locator("main").inner_text()
    assert "Moderation" in body and "Timings" in body and "Recipe" in body
    assert page.locator("table.moderation tbody tr").count() >= 2
    assert page.locator("table.timings tbody tr").count() >= 4
    shot("candidate")

    # The workers of the session's farm, with what they loaded.
    page.click("header nav >> text=Workers")
    assert page.locator("table.workers tbody tr").count() >= 2
    assert "cuda0" in page.locator("table.workers").inner_text()
    shot("workers")


def test_cancel_a_running_batch(page, shot, live_server, settings, stack):
    base = live_server.url
    items = "\n".join(f"  - a tiny landscape number {n}" for n in range(40))
    manifest = ("name: browser-cancel\nmodel: tiny\n"
                f"defaults: {{candidates: 4, steps: 4, size: 64x64, seed: 5}}\nitems:\n{items}\n")
    submitted = dispatch.submit(manifest, settings=settings)
    batch_id = submitted.batch_id
    page.goto(f"{base}/batches/{batch_id}")
    # Wait until the workers are on it, so this cancels work in flight rather than a queued batch. (The page
    # polls, and reloads itself when the status changes: a locator assertion follows it across the reload.)
    expect(page.locator("#batch-status")).to_have_text("running", timeout=120_000)
    page.wait_for_load_state()
    shot("running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-batch")
    page.wait_for_url(f"{base}/batches/{batch_id}")
    assert "Batch cancelled." in page.locator(".flash").inner_text()
    # "cancelling" while the slices in flight stop (unless they all stopped already).
    assert page.locator("#batch-status").inner_text() in ("cancelling", "cancelled")
    assert page.locator("#cancel-batch").count() == 0 and page.locator("#resume-batch").count() == 0
    shot("cancelling")
    # Left open, the page follows the batch until it is closed.
    expect(page.locator("#batch-status")).to_have_text("cancelled", timeout=180_000)
    page.wait_for_load_state()
    shot("cancelled-live")

    # The batch closes: every item is ranked or closed, every candidate final, finished_at set.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        stack.check_alive()
        with session_scope(settings.database_url) as s:
            b = s.get(Batch, batch_id)
            open_cands = s.scalar(select(func.count()).select_from(Candidate).where(
                Candidate.batch_id == batch_id, Candidate.status.not_in(CANDIDATE_FINAL)))
        if b.finished_at is not None and open_cands == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"cancelled batch did not close: items {b.items_done}/{b.items_total}, "
                             f"{open_cands} candidates not final")
    assert b.status == "cancelled" and b.items_done == b.items_total
    with session_scope(settings.database_url) as s:
        cancelled = s.scalar(select(func.count()).select_from(Candidate).where(
            Candidate.batch_id == batch_id, Candidate.status == "cancelled"))
    assert cancelled > 0, "some pending work should have been skipped"

    page.reload()
    _wait_images(page, ".pictures img")
    facts = page.locator("dl.facts").inner_text()
    assert "Finished" in facts
    assert page.locator("#batch-status").inner_text() == "cancelled"
    shot("closed")
    page.goto(f"{base}/")
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    assert row.locator("[data-field=status]").inner_text() == "cancelled"
    assert row.locator("[data-field=finished]").inner_text() != "–"
    shot("list")


def test_invalid_manifest_shows_errors_next_to_the_fields(page, shot, live_server, settings):
    base = live_server.url
    before = _batch_count(settings)
    page.goto(f"{base}/upload")
    page.fill("#manifest_text", BAD)
    page.click("button[value=submit]")
    errors = page.locator("#manifest-errors")
    errors.wait_for()
    size = page.locator('tr.field-error[data-path="items[1].size"]')
    count = page.locator('tr.field-error[data-path="items[2].candidates"]')
    assert size.count() == 1 and count.count() == 1
    assert "items[1].size" in size.inner_text() and size.locator("td").nth(1).inner_text().strip()
    assert "items[2].candidates" in count.inner_text()
    assert "nothing was queued" in errors.inner_text()
    assert page.locator("#manifest_text").get_attribute("aria-invalid") == "true"
    assert page.locator("#manifest_text").input_value() == BAD  # the text is kept for fixing
    assert _batch_count(settings) == before
    shot("errors")
