//! The cache page: charts and counters that follow Sets and Gets, the key
//! browser (pattern, view in each form, delete), clear level behind its
//! confirmation, koo's message for a bad pattern.

import assert from "node:assert/strict";
import { before, test } from "node:test";
import type { Browser } from "playwright-core";
import { grpcurl, numberIn, openPage, screenshot, waitUntil, type Koo } from "./harness";
import { assertNoErrors, attrUntil, live, shared, textNumber } from "./helpers";

/** Registers the tests (inside the caller's describe). */
export function cacheTests(): void {
  let koo: Koo;
  let browser: Browser;
  before(() => ({ koo, browser } = shared()));

  test("the cache charts and counters follow grpcurl's Sets and Gets; the key browser views, deletes and clears", async () => {
    const p = await openPage(browser, koo, "#/cache");
    const { page } = p;
    await live(page);
    const hitsChart = '[data-testid="cache-chart-hits"]';
    const latencyChart = '[data-testid="cache-chart-latency"]';
    const samples0 = Number(await attrUntil(page, hitsChart, "data-samples", (v) => Number(v) >= 1, "a first metrics sample"));
    const latency0 = Number(await page.locator(latencyChart).getAttribute("data-samples"));
    const sets0 = await textNumber(page, "cache-sets");
    const hits0 = await textNumber(page, "cache-hits");
    assert.ok(Number.isFinite(sets0) && Number.isFinite(hits0), "the sets and hits counters show numbers");

    const set = (key: string, value: unknown, level = "CACHE_LEVEL_APP") =>
      grpcurl(koo, "koo.cache.v1.CacheService/Set", { level, key, value });
    const big = "koo dashboard ".repeat(5000); // 70,000 characters: compressed, and cut in the view
    await set("web-test:text", { text: "hello from the browser tests" });
    await set("web-test:json", { json: { answer: 42, nested: { list: [1, 2, 3] } } });
    await set("web-test:raw", { raw: Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0x01]).toString("base64") });
    await set("web-test:big", { text: big });
    await set("web-test:session", { text: "s" }, "CACHE_LEVEL_SESSION");
    for (const key of ["web-test:text", "web-test:json", "web-test:raw"]) {
      await grpcurl(koo, "koo.cache.v1.CacheService/Get", { key });
    }
    await grpcurl(koo, "koo.cache.v1.CacheService/Get", { key: "web-test:missing" });

    await waitUntil("the counters to show the 5 Sets and 3 hits", async () => {
      const sets = await textNumber(page, "cache-sets");
      const hits = await textNumber(page, "cache-hits");
      return sets >= sets0 + 5 && hits >= hits0 + 3 ? true : undefined;
    });
    const samples1 = Number(
      await attrUntil(page, hitsChart, "data-samples", (v) => Number(v) >= samples0 + 2, "the hit ratio chart to take new samples"),
    );
    await attrUntil(page, latencyChart, "data-samples", (v) => Number(v) > latency0, "the latency chart to take new samples");
    // per level: the session level's one Set shows in the levels table's operation count
    await waitUntil("the levels table to count the session level's operation", async () => {
      const row = page.locator('[data-testid="cache-levels"] tr', { hasText: "session" });
      const cells = await row.locator("td").allTextContents();
      return cells.length >= 9 && numberIn(cells[8]) >= 1 ? true : undefined;
    });
    assert.ok(Number(await page.locator('[data-testid="cache-chart-level-latency"]').getAttribute("data-samples")) >= 1);
    assert.ok(samples1 > samples0);
    assert.ok(numberIn(await page.getByTestId("cache-hit-ratio").textContent()) > 0, "a hit ratio above 0%");

    // Some traffic while the key browser is used, so the charts have lines to show.
    let traffic = true;
    const trafficDone = (async () => {
      for (let i = 0; traffic; i++) {
        await grpcurl(koo, "koo.cache.v1.CacheService/Get", { key: i % 3 ? "web-test:json" : "web-test:nothing" });
        if (i % 4 === 0) await set(`web-test:load-${i % 3}`, { text: "x".repeat(100 * i) }, "CACHE_LEVEL_API");
      }
    })();

    // The key browser: pattern, list, view each form.
    await page.getByTestId("cache-pattern").fill("web-test:*");
    await page.getByTestId("cache-search").click();
    const keyRow = (key: string) => `[data-testid="cache-key-row"][data-key="${key}"]`;
    for (const key of ["web-test:text", "web-test:json", "web-test:raw", "web-test:big"]) {
      await page.locator(keyRow(key)).waitFor();
    }
    assert.equal(await page.locator(keyRow("web-test:session")).count(), 0, "the session level's key is not listed under app");
    const view = async (key: string) => {
      await page.locator(`${keyRow(key)} [data-testid="cache-view"]`).click();
      await page.locator(`[data-testid="cache-value"]`).filter({ hasText: key }).waitFor();
      return (await page.getByTestId("cache-value-body").textContent()) ?? "";
    };
    const shown = await view("web-test:big");
    assert.ok(shown.length < big.length && shown.length > 1000, `the large value is cut (${shown.length} shown)`);
    await page.getByText(/Showing the first/).waitFor();
    assert.match(await view("web-test:raw"), /de ad be ef 00 01/);
    assert.equal(await page.getByTestId("cache-value").getAttribute("data-kind"), "bytes");
    assert.equal(await view("web-test:text"), "hello from the browser tests");
    assert.match(await view("web-test:json"), /"answer": 42/);
    await attrUntil(page, hitsChart, "data-samples", (v) => Number(v) >= samples1 + 6, "a few more samples, for the picture");
    traffic = false;
    await trafficDone;
    await screenshot(page, "cache");

    // Delete (a writer's button), seen by a Get.
    await page.locator(`${keyRow("web-test:text")} [data-testid="cache-delete"]`).click();
    await page.locator(keyRow("web-test:text")).waitFor({ state: "detached" });
    const gone = await grpcurl(koo, "koo.cache.v1.CacheService/Get", { key: "web-test:text" });
    assert.ok(!gone.found, "the deleted key is gone");

    // Clear the level behind its confirmation: one click arms it, nothing is removed yet.
    const clear = page.getByTestId("cache-clear");
    await clear.click();
    assert.equal(await clear.getAttribute("data-armed"), "true");
    assert.ok((await grpcurl(koo, "koo.cache.v1.CacheService/Get", { key: "web-test:json" })).found, "not cleared before confirming");
    await clear.click();
    await page.getByText(/cleared level app/).waitFor();
    const left = await grpcurl(koo, "koo.cache.v1.CacheService/ListKeys", { level: "CACHE_LEVEL_APP", pageSize: 1000 });
    assert.deepEqual(left.keys ?? [], [], "the app level is empty");
    const session = await grpcurl(koo, "koo.cache.v1.CacheService/Get", { level: "CACHE_LEVEL_SESSION", key: "web-test:session" });
    assert.ok(session.found, "other levels are untouched");

    // A bad pattern shows koo's message, not a blank page.
    await page.getByTestId("cache-pattern").fill("[");
    await page.getByTestId("cache-search").click();
    await page.getByTestId("cache-error").filter({ hasText: /INVALID_ARGUMENT/ }).waitFor();
    assertNoErrors(p);
    await p.close();
  });

  test("the key browser pages through a level: Next until the last page, Previous back", async () => {
    const keys = Array.from({ length: 120 }, (_, i) => `web-page:${String(i).padStart(3, "0")}`);
    await grpcurl(koo, "koo.cache.v1.CacheService/SetMany", {
      entries: keys.map((key) => ({ level: "CACHE_LEVEL_DB", key, value: { text: key } })),
    });
    const p = await openPage(browser, koo, "#/cache");
    const { page } = p;
    await page.getByTestId("cache-level").selectOption({ label: "db" });
    await page.getByTestId("cache-pattern").fill("web-page:*");
    await page.getByTestId("cache-search").click();
    const info = page.getByTestId("cache-page-info");
    const seen = new Set<string>();
    let pages = 0;
    for (;;) {
      pages++;
      await info.filter({ hasText: `page ${pages} of db` }).waitFor();
      const listed = await page.locator('[data-testid="cache-key-row"]').evaluateAll((rows) => rows.map((r) => r.getAttribute("data-key") ?? ""));
      assert.ok(listed.length <= 50, `a page holds at most 50 keys (${listed.length})`);
      listed.forEach((k) => seen.add(k));
      const next = page.getByTestId("cache-next");
      if (await next.isDisabled()) break;
      assert.ok(pages < 20, "the listing ends");
      await next.click();
    }
    assert.deepEqual([...seen].sort(), keys, "every key listed once the pages are walked");
    assert.ok(pages >= 3, `120 keys take at least 3 pages of 50 (${pages})`);
    await page.getByTestId("cache-prev").click();
    await info.filter({ hasText: `page ${pages - 1} of db` }).waitFor();
    assertNoErrors(p);
    await p.close();
  });
}
