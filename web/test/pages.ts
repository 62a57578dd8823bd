//! Every page: loads without console errors, moves by its nav, survives a koo
//! restart (reconnecting, then live); the screenshots of the pages that no
//! other suite takes.

import assert from "node:assert/strict";
import { before, test } from "node:test";
import type { Browser } from "playwright-core";
import { grpcurl, openPage, prefixServer, screenshot, startKoo, submitTask, waitUntil, type Koo } from "./harness";
import { assertNoErrors, attrUntil, live, shared, textUntil } from "./helpers";

const ROUTES = ["queues", "workers", "tasks", "dead", "schedules", "cache"] as const;
const SLEEP = "koo.diagnostics.sleep";

/** Registers the tests (inside the caller's describe). */
export function pageTests(): void {
  let koo: Koo;
  let browser: Browser;
  before(() => ({ koo, browser } = shared()));

  test("every page loads with no console errors, and the nav moves between them", async () => {
    for (const route of ROUTES) {
      const p = await openPage(browser, koo, `#/${route}`);
      await p.page.locator(`[data-testid="nav-${route}"][aria-current="page"]`).waitFor();
      await live(p.page);
      await p.page.locator("main h1").first().waitFor();
      assertNoErrors(p);
      await p.close();
    }
    // One page through the nav: each view's streams stop and start without errors.
    const p = await openPage(browser, koo, "");
    await live(p.page);
    for (const route of [...ROUTES, "queues"]) {
      await p.page.getByTestId(`nav-${route}`).click();
      await p.page.locator(`[data-testid="nav-${route}"][aria-current="page"]`).waitFor();
      await live(p.page);
    }
    assertNoErrors(p);
    await p.close();
  });

  test("behind a path prefix (a reverse proxy's /ops/koo/), the page loads its files and calls koo relative to it", async () => {
    const front = await prefixServer(koo, "/ops/koo/");
    try {
      const context = await browser.newContext();
      const page = await context.newPage();
      const errors: string[] = [];
      page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
      page.on("pageerror", (e) => errors.push(e.message));
      await page.goto(`${front.base}#/cache`);
      await live(page);
      await attrUntil(page, '[data-testid="cache-chart-hits"]', "data-samples", (v) => Number(v) >= 1, "a metrics sample through the prefix");
      await page.getByTestId("nav-schedules").click();
      await page.locator('[data-testid="schedule-row"][data-name="health-check"]').waitFor();
      assert.ok(page.url().startsWith(`${front.base}#/schedules`), page.url());
      assert.deepEqual(errors, []);
      await context.close();
    } finally {
      front.close();
    }
  });

  test("a task id koo does not know shows koo's status, not a blank page", async () => {
    for (const [id, code] of [
      ["research~01a0000000000000000000000000dead", /NOT_FOUND/],
      ["no-such-task", /INVALID_ARGUMENT|NOT_FOUND/],
    ] as const) {
      const p = await openPage(browser, koo, `#/tasks/${id}`);
      await p.page.getByTestId("task-error").filter({ hasText: code }).waitFor();
      await p.page.getByTestId("nav-tasks").waitFor();
      assertNoErrors(p);
      await p.close();
    }
  });
}

/** Registers the screenshots of the queues, workers, feed and dead letters pages, and the restart test. */
export function screenshotTests(): void {
  let koo: Koo;
  let browser: Browser;
  before(() => ({ koo, browser } = shared()));

  test("screenshots of the queues, workers, task feed and dead letters pages, with work in them", async () => {
    const p = await openPage(browser, koo, "#/queues");
    const { page } = p;
    await live(page);
    const samples = async () => Number(await page.getByTestId("chart-throughput").getAttribute("data-samples"));

    // Work arriving over a few seconds, so the charts have something to show:
    // three long sleeps (running), echoes each second, and a dead letter.
    const running: string[] = [];
    for (const category of ["TASK_CATEGORY_AI_SERVICE", "TASK_CATEGORY_PDF_PROCESSING", "TASK_CATEGORY_RESEARCH"]) {
      running.push(await submitTask(koo, { name: SLEEP, category, kwargs: { seconds: 30, steps: 60 }, maxRetries: 0 }));
    }
    const dead = await submitTask(koo, {
      name: "koo.diagnostics.fail_times",
      category: "TASK_CATEGORY_PDF_PROCESSING",
      kwargs: { failures: 100 },
      maxRetries: 0,
    });
    for (let i = 0; i < 5; i++) {
      const before = await samples();
      for (let j = 0; j <= i % 3; j++) {
        await submitTask(koo, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_DATABASE", kwargs: { result: i } });
      }
      await waitUntil("the next throughput sample", async () => ((await samples()) > before ? true : undefined));
    }
    await waitUntil(`${dead} to fail`, async () => {
      const t = await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: dead });
      return t.task.state === "TASK_STATE_FAILED" ? true : undefined;
    });
    await screenshot(page, "queues");

    await page.getByTestId("nav-workers").click();
    await page.getByText(/^koo:\d+:[0-9a-f]+$/).first().waitFor(); // the built-in pool's worker id
    await page.getByText("3/4").first().waitFor(); // the three sleeps hold three of the pool's four slots
    await waitUntil("the workers chart to hold 3 samples", async () => {
      const counts = await page.locator("main [data-samples]").evaluateAll((els) => els.map((e) => Number(e.getAttribute("data-samples"))));
      return counts.length > 0 && counts.every((n) => n >= 3) ? true : undefined;
    });
    await screenshot(page, "workers");

    await page.getByTestId("nav-tasks").click();
    for (const id of [...running, dead]) await page.locator(`[data-testid="feed-row"][data-task-id="${id}"]`).waitFor();
    await screenshot(page, "tasks");

    await page.getByTestId("nav-dead").click();
    await page.getByText(dead).first().waitFor();
    await screenshot(page, "dead");
    assertNoErrors(p);
    await p.close();
    for (const id of running) await grpcurl(koo, "koo.tasks.v1.TaskService/CancelTask", { taskId: id });
  });

  test("a koo restart: the pages say reconnecting, then live again; the feed and the cache charts follow the new koo", async () => {
    const restarted = await startKoo({ name: "koo-restart" });
    try {
      const feed = await openPage(browser, restarted, "#/tasks");
      const metrics = await openPage(browser, restarted, "#/cache");
      await live(feed.page);
      await live(metrics.page);
      const chart = '[data-testid="cache-chart-hits"]';
      await attrUntil(metrics.page, chart, "data-samples", (v) => Number(v) >= 1, "a first metrics sample");

      await restarted.kill();
      for (const p of [feed, metrics]) {
        await textUntil(p.page, '[data-testid="conn-status"]', (t) => t === "reconnecting", "the badge to say reconnecting");
      }
      await metrics.page.getByText(/reconnecting to the metrics stream/).waitFor();
      const before = Number(await metrics.page.locator(chart).getAttribute("data-samples"));
      await restarted.restart();

      await live(feed.page);
      const id = await submitTask(restarted, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_RESEARCH" });
      await feed.page.locator(`[data-testid="feed-row"][data-task-id="${id}"]`).waitFor();
      await live(metrics.page);
      await attrUntil(metrics.page, chart, "data-samples", (v) => Number(v) > before + 1, "the hit ratio chart to take samples from the new koo");
      await metrics.page.getByText(/reconnecting to the metrics stream/).waitFor({ state: "detached" });
      for (const p of [feed, metrics]) {
        // While koo was down the browser itself logs the refused connections;
        // anything else is the page's own error.
        const own = p.errors.filter(
          (e) => !/Failed to load resource: net::ERR_(CONNECTION_REFUSED|EMPTY_RESPONSE|CONNECTION_RESET|INCOMPLETE_CHUNKED_ENCODING)/.test(e),
        );
        assert.deepEqual(own, []);
        await p.close();
      }
    } finally {
      await restarted.stop();
    }
  });
}
