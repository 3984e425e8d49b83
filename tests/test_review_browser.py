"""End to end in Debian's headless Chromium: confirm a match, reload, see it kept.

Set REVIEW_SCREENSHOT=/some/file.png to keep a screenshot of the page after the decisions.
"""

import os
import pathlib
import shutil
import threading

import pytest

from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import server as server_lib
from leopard_jax.review import store as store_lib
from leopard_jax.review import synthetic

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium (scripts/install_chromium.sh)"
    ),
]


@pytest.fixture
def served(tmp_path):
    catalog = cand_lib.load_catalog(
        synthetic.write_synthetic(tmp_path / "data", individuals=4, per_individual=3)
    )
    store = store_lib.Store(tmp_path / "matches.db")
    server = server_lib.make_server(server_lib.ReviewApp(catalog, store), "127.0.0.1", 0)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    yield server_lib.server_url(server), catalog, store
    server.shutdown()
    server.server_close()


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.set_default_timeout(20_000)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            yield page
        finally:
            browser.close()


def _open(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def _card_indices(page, selector=".card"):
    return [
        int(x) for x in page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.index)")
    ]


def test_confirm_match_reload_and_see_it_kept(served, page, tmp_path):
    from playwright.sync_api import expect  # wait-for-text without eval (the page's CSP forbids it)

    url, catalog, store = served
    _open(page, url)
    assert page.text_content("#progress-text") == f"Reviewed 0 of {len(catalog)}"
    assert page.text_content("#anchor-title") == "#0"
    shown = _card_indices(page)
    assert len(shown) == 5
    assert [c for c, _ in cand_lib.top_candidates(catalog, store_lib.build_graph([]), 0)] == shown
    # The cards are in the page before their images have loaded: wait (auto-retrying expect)
    # until each has, then check that it decoded to a real picture.
    crops = page.locator("img[data-crop]")
    assert crops.count() >= len(shown)
    for i in range(crops.count()):
        expect(crops.nth(i)).to_have_js_property("complete", True)
    assert page.eval_on_selector_all(
        "img[data-crop]", "els => els.every(e => e.complete && e.naturalWidth > 0)"
    )

    # Crop/edge toggle and zoom.
    page.keyboard.press("e")
    assert page.get_attribute("#anchor-img", "src").endswith("/image/0/edge")
    page.keyboard.press("e")
    assert page.get_attribute("#anchor-img", "src").endswith("/image/0/crop")
    page.click("#anchor-img")
    assert page.is_visible("#zoom")
    page.keyboard.press("Escape")
    assert page.is_hidden("#zoom")

    # Match the first candidate with the keyboard, "no match" the second with its button.
    page.keyboard.press("m")
    page.wait_for_selector(f".card.matched[data-index='{shown[0]}']")
    page.click(f".card[data-index='{shown[1]}'] button.no-match")
    page.wait_for_selector(f".card.rejected[data-index='{shown[1]}']")
    assert "Saved" in page.text_content("#status")
    kinds = [(d.kind, d.candidate) for d in store.decisions()]
    assert kinds == [("match", catalog.keys[shown[0]]), ("no_match", catalog.keys[shown[1]])]
    shot = tmp_path / "review.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("REVIEW_SCREENSHOT"):
        shutil.copy(shot, os.environ["REVIEW_SCREENSHOT"])

    # Reload: the match is kept (shown as the same individual, no longer asked about).
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#anchor-title") == "#0"
    assert _card_indices(page, "#same-list figure") == [shown[0]]
    assert not {shown[0], shown[1]} & set(_card_indices(page))

    # Next anchor advances and counts; undo brings it back.
    page.click("#next-btn")
    expect(page.locator("#anchor-title")).to_have_text("#1")
    assert page.text_content("#progress-text") == f"Reviewed 1 of {len(catalog)}"
    page.keyboard.press("u")
    expect(page.locator("#anchor-title")).to_have_text("#0")
    assert page.text_content("#progress-text") == f"Reviewed 0 of {len(catalog)}"
    assert page.errors == []


def test_calibrated_probability_and_the_verified_correspondences_are_shown(tmp_path, page):
    """With a pair scorer the cards show P(same) and a picture of the verified spot matches."""
    import cv2
    from playwright.sync_api import expect

    from leopard_jax.local import features, pairs

    catalog = cand_lib.load_catalog(
        synthetic.write_synthetic(tmp_path / "data", individuals=3, per_individual=2)
    )
    keypoints = [features.extract(cv2.imread(c)[..., ::-1]) for c in catalog.crops]
    calibrator = {  # a hand-made one: P rises with cosine and inliers
        "weights": {"deep": [4.0, -2.0], "local": [2.0, -5.0], "fused": [1.0, 1.0, 0.0]},
    }
    scorer = pairs.PairScorer(keypoints.__getitem__, catalog.embeddings, calibrator)
    store = store_lib.Store(tmp_path / "matches.db")
    server = server_lib.make_server(
        server_lib.ReviewApp(catalog, store, scorer=scorer), "127.0.0.1", 0
    )
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        _open(page, server_lib.server_url(server))
        shown = _card_indices(page)
        first = page.locator(".card").first
        want = scorer.score(0, shown[0])[0]
        expect(first.locator(".score")).to_have_text(f"P(same) {want:.2f}")
        pair = first.locator("img.pair")
        expect(pair).to_have_js_property("complete", True)
        assert pair.evaluate("e => e.naturalWidth") > 0
        assert pair.get_attribute("src") == f"/pair/0/{shown[0]}"
        assert scorer.score(0, shown[0])[1].inliers >= 4  # its own individual: real matches
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()
