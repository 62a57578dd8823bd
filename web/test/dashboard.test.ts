//! The dashboard in a real headless Chromium against a real koo: every page
//! loads without console errors, a task submitted with grpcurl shows up in the
//! live feed and its progress bar moves, Cancel ends it, the cache charts follow
//! Sets and Gets, the schedules page acts on schedules, and with a keys file
//! the page asks for a key and shows write buttons only to the roles allowed.
//! Screenshots of every page go to target/dashboard-screenshots/.
//!
//! One koo (open) and one browser serve every test but the auth ones, which
//! share a second koo started with KOO_AUTH_FILE.

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import type { Browser, Page } from "playwright-core";
import {
  closeLeftPages,
  grpcurl,
  keysFile,
  launchBrowser,
  newKey,
  numberIn,
  openPage,
  screenshot,
  startKoo,
  submitTask,
  waitUntil,
  type Koo,
  type WatchedPage,
} from "./harness";

const ROUTES = ["queues", "workers", "tasks", "dead", "schedules", "cache"] as const;

let koo: Koo;
let browser: Browser;

before(async () => {
  [koo, browser] = await Promise.all([startKoo({ name: "koo" }), launchBrowser()]);
});

afterEach(async (t) => {
  await closeLeftPages(t.name);
});

after(async () => {
  await browser?.close();
  await koo?.stop();
});

/** Resolves once the first element's text (trimmed) satisfies `ok`; a timeout names the last text seen. */
async function textUntil(page: Page, selector: string, ok: (text: string) => boolean, what: string): Promise<string> {
  let last: string | null = null;
  try {
    return await waitUntil(what, async () => {
      last = (await page.locator(selector).first().textContent({ timeout: 1000 }).catch(() => null))?.trim() ?? null;
      return last !== null && ok(last) ? last : undefined;
    });
  } catch (e) {
    throw new Error(`${(e as Error).message} (${selector} last said ${JSON.stringify(last)})`);
  }
}

/** Waits until the header's connection badge says `live` (a stream or poll answered). */
async function live(page: Page): Promise<void> {
  await textUntil(page, '[data-testid="conn-status"]', (t) => t === "live", "the connection badge to say live");
}

/** Waits until the task page's state says `state`. */
async function taskState(page: Page, state: string): Promise<void> {
  await textUntil(page, '[data-testid="task-state"]', (t) => t === state, `the task page to say ${state}`);
}

/** The test's page must not have logged a console error or thrown. */
function assertNoErrors(p: WatchedPage): void {
  assert.deepEqual(p.errors, [], "the page logged errors");
}

/** Clicks a button; a confirming one (data-armed) is clicked a second time. */
async function clickConfirmed(page: Page, selector: string): Promise<void> {
  await page.locator(selector).click();
  // a confirming button is armed now; a plain one may already be gone
  const armed = page.locator(`${selector}[data-armed="true"]`);
  if ((await armed.count()) > 0) await armed.click();
}

/** Resolves with the attribute's value once `ok` accepts it. */
async function attrUntil(page: Page, selector: string, attr: string, ok: (v: string) => boolean, what: string): Promise<string> {
  let last: string | null = null;
  try {
    return await waitUntil(what, async () => {
      last = await page.locator(selector).first().getAttribute(attr, { timeout: 1000 }).catch(() => null);
      return last !== null && ok(last) ? last : undefined;
    });
  } catch (e) {
    throw new Error(`${(e as Error).message} (${selector} ${attr} was ${JSON.stringify(last)})`);
  }
}

async function textNumber(page: Page, testid: string): Promise<number> {
  return numberIn(await page.getByTestId(testid).textContent());
}

const SLEEP = "koo.diagnostics.sleep";

describe("the open dashboard", () => {
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

  test("a task submitted with grpcurl appears in the feed, its progress bar moves, and Cancel ends it CANCELLED", async () => {
    const p = await openPage(browser, koo, "#/tasks");
    const { page } = p;
    await live(page);
    const id = await submitTask(koo, {
      name: SLEEP,
      category: "TASK_CATEGORY_RESEARCH",
      kwargs: { seconds: 6, steps: 30 },
      maxRetries: 0,
    });
    const row = `[data-testid="feed-row"][data-task-id="${id}"]`;
    await page.locator(row).waitFor();
    await attrUntil(page, row, "data-state", (s) => s === "RUNNING", `the feed row of ${id} to say RUNNING`);

    // The row links to the task page.
    await page.locator(`${row} a[href*="${id}"]`).first().click();
    await page.waitForURL(`**#/tasks/${id}`);
    const bar = '[data-testid="task-progress"]';
    let percent = Number(await attrUntil(page, bar, "data-percent", () => true, "a progress bar"));
    const seen = [percent];
    for (let rise = 0; rise < 2; rise++) {
      const before = percent;
      percent = Number(await attrUntil(page, bar, "data-percent", (v) => Number(v) > before, `the progress bar to pass ${before}%`));
      seen.push(percent);
    }
    assert.ok(seen[2] > seen[1] && seen[1] > seen[0] && seen[2] < 100, `progress rose twice while running: ${seen}`);
    assert.equal((await page.getByTestId("task-state").textContent())?.trim(), "RUNNING");
    await attrUntil(page, bar, "data-percent", (v) => Number(v) >= 30, "the progress bar to pass 30%"); // for the picture
    await screenshot(page, "task");

    await clickConfirmed(page, '[data-testid="task-cancel"]');
    await taskState(page, "CANCELLED");
    const got = await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: id });
    assert.equal(got.task.state, "TASK_STATE_CANCELLED");

    // The feed saw the end too.
    await page.getByTestId("nav-tasks").click();
    await attrUntil(page, row, "data-state", (s) => s === "CANCELLED", `the feed row of ${id} to say CANCELLED`);

    // Retry runs it again under the same id.
    await page.goBack();
    await page.waitForURL(`**#/tasks/${id}`);
    await page.getByTestId("task-retry").click();
    await textUntil(page, '[data-testid="task-state"]', (t) => t === "RUNNING" || t === "QUEUED", "the retried task to run again");
    const retried = await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: id });
    assert.notEqual(retried.task.state, "TASK_STATE_CANCELLED");
    await grpcurl(koo, "koo.tasks.v1.TaskService/CancelTask", { taskId: id });
    assertNoErrors(p);
    await p.close();
  });

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
    assert.ok(samples1 > samples0);
    assert.ok(numberIn(await page.getByTestId("cache-hit-ratio").textContent()) > 0, "a hit ratio above 0%");

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

  test("the schedules page shows next fire times and the last run, and pauses, resumes and triggers", async () => {
    const name = "web-test-nightly";
    await grpcurl(koo, "koo.schedule.v1.ScheduleService/CreateSchedule", {
      schedule: {
        name,
        cron: "0 3 * * *",
        timeZone: "Europe/Paris",
        task: { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_RESEARCH", kwargs: { result: "nightly" } },
      },
    });
    const p = await openPage(browser, koo, "#/schedules");
    const { page } = p;
    const row = `[data-testid="schedule-row"][data-name="${name}"]`;
    await page.locator(row).waitFor();
    await page.locator('[data-testid="schedule-row"][data-name="health-check"]').waitFor();
    assert.match((await page.locator(`${row} [data-testid="schedule-next"]`).textContent()) ?? "", /\d/);
    assert.match((await page.locator(row).textContent()) ?? "", /never/);

    await page.locator(`${row} [data-testid="schedule-trigger"]`).click();
    const link = page.locator(`${row} [data-testid="schedule-last-task"]`);
    await link.waitFor();
    const taskId = (await link.textContent())?.trim() ?? "";
    const stored = await grpcurl(koo, "koo.schedule.v1.ScheduleService/GetSchedule", { name });
    assert.equal(stored.schedule.lastRun.taskId, taskId);
    assert.equal(stored.schedule.lastRun.triggered, true);

    await page.locator(`${row} [data-testid="schedule-pause"]`).click();
    await page.locator(`${row}[data-paused="true"]`).waitFor();
    assert.equal((await grpcurl(koo, "koo.schedule.v1.ScheduleService/GetSchedule", { name })).schedule.paused, true);
    await page.locator(`${row} [data-testid="schedule-resume"]`).click();
    await page.locator(`${row}[data-paused="false"]`).waitFor();
    assert.ok(!(await grpcurl(koo, "koo.schedule.v1.ScheduleService/GetSchedule", { name })).schedule.paused);
    await screenshot(page, "schedules");

    // The last run links to its task's page.
    await link.click();
    await page.waitForURL(`**#/tasks/${taskId}`);
    await taskState(page, "SUCCEEDED");
    assertNoErrors(p);
    await p.close();
  });

  test("screenshots of the queues, workers, task feed and dead letters pages, with work in them", async () => {
    const running: string[] = [];
    for (const category of ["TASK_CATEGORY_AI_SERVICE", "TASK_CATEGORY_PDF_PROCESSING", "TASK_CATEGORY_RESEARCH"]) {
      running.push(await submitTask(koo, { name: SLEEP, category, kwargs: { seconds: 30, steps: 60 }, maxRetries: 0 }));
    }
    for (let i = 0; i < 3; i++) {
      await submitTask(koo, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_DATABASE", kwargs: { result: i } });
    }
    const dead = await submitTask(koo, {
      name: "koo.diagnostics.fail_times",
      category: "TASK_CATEGORY_PDF_PROCESSING",
      kwargs: { failures: 100 },
      maxRetries: 0,
    });
    await waitUntil(`${dead} to fail`, async () => {
      const t = await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: dead });
      return t.task.state === "TASK_STATE_FAILED" ? true : undefined;
    });

    const p = await openPage(browser, koo, "#/queues");
    const { page } = p;
    await live(page);
    // charts with a few samples, so they show lines
    await waitUntil("the queue charts to hold 3 samples", async () => {
      const counts = await page.locator("[data-samples]").evaluateAll((els) => els.map((e) => Number(e.getAttribute("data-samples"))));
      return counts.length > 0 && counts.every((n) => n >= 3) ? true : undefined;
    });
    await screenshot(page, "queues");

    await page.getByTestId("nav-workers").click();
    await page.getByText(/^koo:\d+:[0-9a-f]+$/).first().waitFor(); // the built-in pool's worker id
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

  test("dead letters: Requeue runs one again, Requeue all (confirmed) runs the rest", async () => {
    const failing = { name: "koo.diagnostics.fail_times", category: "TASK_CATEGORY_RESEARCH", kwargs: { failures: 100 }, maxRetries: 0 };
    const [one, other] = [await submitTask(koo, failing), await submitTask(koo, failing)];
    const attempts = async (id: string) => (await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: id })).task;
    for (const id of [one, other]) {
      await waitUntil(`${id} to fail`, async () => ((await attempts(id)).state === "TASK_STATE_FAILED" ? true : undefined));
    }
    const p = await openPage(browser, koo, "#/dead");
    const { page } = p;
    const row = (id: string) => `[data-testid="dead-row"][data-task-id="${id}"]`;
    await page.locator(row(one)).waitFor();
    await page.locator(row(other)).waitFor();

    await page.locator(`${row(one)} [data-testid="dead-requeue"]`).click();
    await waitUntil(`${one} to run and fail again`, async () => {
      const t = await attempts(one);
      return t.attempts === 2 && t.state === "TASK_STATE_FAILED" ? true : undefined;
    });
    assert.equal((await attempts(other)).attempts, 1, "only the one requeued ran again");

    await clickConfirmed(page, '[data-testid="dead-requeue-all"]');
    await waitUntil(`${other} to run again`, async () => ((await attempts(other)).attempts >= 2 ? true : undefined));
    assertNoErrors(p);
    await p.close();
  });

  test("a koo restart: the page says reconnecting, then live again, and the feed follows the new koo", async () => {
    const restarted = await startKoo({ name: "koo-restart" });
    try {
      const p = await openPage(browser, restarted, "#/tasks");
      const { page } = p;
      await live(page);
      await restarted.kill();
      await textUntil(page, '[data-testid="conn-status"]', (t) => t === "reconnecting", "the badge to say reconnecting");
      await restarted.restart();
      await live(page);
      const id = await submitTask(restarted, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_RESEARCH" });
      await page.locator(`[data-testid="feed-row"][data-task-id="${id}"]`).waitFor();
      // While koo was down the browser itself logs the refused connections;
      // anything else is the page's own error.
      const own = p.errors.filter((e) => !/Failed to load resource: net::ERR_(CONNECTION_REFUSED|EMPTY_RESPONSE|CONNECTION_RESET|INCOMPLETE_CHUNKED_ENCODING)/.test(e));
      assert.deepEqual(own, []);
      await p.close();
    } finally {
      await restarted.stop();
    }
  });
});

describe("the dashboard with API keys (KOO_AUTH_FILE)", () => {
  let secure: Koo;
  const keys: Record<"admin" | "writer" | "reader", string> = { admin: "", writer: "", reader: "" };
  let deadTask = "";
  let getCaller = true;

  before(async () => {
    const made = await Promise.all((["admin", "writer", "reader"] as const).map((role) => newKey(`web-${role}`, role)));
    (["admin", "writer", "reader"] as const).forEach((role, i) => (keys[role] = made[i].key));
    secure = await startKoo({
      name: "koo-auth",
      env: { KOO_AUTH_FILE: keysFile(made.map((m) => m.entry)) },
      adminKey: keys.admin,
    });
    await grpcurl(secure, "koo.cache.v1.CacheService/Set", { key: "web-test:auth", value: { text: "v" } });
    deadTask = await submitTask(secure, {
      name: "koo.diagnostics.fail_times",
      category: "TASK_CATEGORY_RESEARCH",
      kwargs: { failures: 100 },
      maxRetries: 0,
    });
    await waitUntil(`${deadTask} to fail`, async () => {
      const t = await grpcurl(secure, "koo.tasks.v1.TaskService/GetTask", { taskId: deadTask });
      return t.task.state === "TASK_STATE_FAILED" ? true : undefined;
    });
    try {
      await grpcurl(secure, "koo.auth.v1.AuthService/GetCaller", {});
    } catch (e) {
      if (!/Unimplemented|does not expose service/i.test(String(e))) throw e;
      getCaller = false; // a koo before AuthService: the page takes everyone for an admin
    }
  });

  after(async () => {
    await secure?.stop();
  });

  async function signIn(p: WatchedPage, key: string, role: string): Promise<void> {
    await p.page.getByTestId("api-key-input").fill(key);
    await p.page.getByTestId("api-key-input").press("Enter");
    await p.page.getByTestId("caller").filter({ hasText: role }).waitFor();
    await live(p.page);
  }

  /** Each page with the content that would carry write buttons loaded: the count of [data-write] elements on it. */
  async function writeButtons(page: Page): Promise<Record<string, number>> {
    const count = () => page.locator("[data-write]").count();
    const out: Record<string, number> = {};
    await page.getByTestId("nav-schedules").click();
    await page.locator('[data-testid="schedule-row"][data-name="health-check"]').waitFor();
    out.schedules = await count();
    await page.getByTestId("nav-dead").click();
    await page.getByText(deadTask).first().waitFor();
    out.dead = await count();
    await page.getByTestId("nav-cache").click();
    await page.getByTestId("cache-pattern").fill("web-test:*");
    await page.getByTestId("cache-search").click();
    await page.locator('[data-testid="cache-key-row"][data-key="web-test:auth"]').waitFor();
    out.cache = await count();
    await page.evaluate((id) => (location.hash = `#/tasks/${id}`), deadTask);
    await taskState(page, "FAILED");
    out.task = await count();
    for (const route of ["queues", "workers", "tasks"]) {
      await page.getByTestId(`nav-${route}`).click();
      await page.locator(`[data-testid="nav-${route}"][aria-current="page"]`).waitFor();
      await live(page);
      out[route] = await count();
    }
    return out;
  }

  test("the page asks for a key, and a bad key shows koo's refusal", async (t) => {
    if (!getCaller) return t.skip("this koo has no AuthService.GetCaller yet");
    const p = await openPage(browser, secure, "#/schedules");
    const { page } = p;
    await page.getByTestId("key-prompt").waitFor();
    await page.getByTestId("api-key-input").waitFor();
    await page.getByTestId("api-key-input").fill("koo_not-a-key");
    await page.getByTestId("api-key-save").click();
    await page.getByText(/not in the keys file/).first().waitFor();
    assert.ok(await page.getByTestId("key-prompt").isVisible(), "the prompt stays");
    assert.equal(await page.locator("[data-write]").count(), 0);
    assertNoErrors(p);
    await p.close();
  });

  test("a reader sees no write button on any page; a writer gets delete but not clear; an admin gets them all", async (t) => {
    if (!getCaller) return t.skip("this koo has no AuthService.GetCaller yet");
    const reader = await openPage(browser, secure, "#/queues");
    await signIn(reader, keys.reader, "reader");
    const none = await writeButtons(reader.page);
    assert.deepEqual(Object.values(none), Object.values(none).map(() => 0), `a reader saw write buttons: ${JSON.stringify(none)}`);
    assertNoErrors(reader);
    await reader.close();

    const writer = await openPage(browser, secure, "#/cache");
    await signIn(writer, keys.writer, "writer");
    await writer.page.getByTestId("cache-pattern").fill("web-test:*");
    await writer.page.getByTestId("cache-search").click();
    await writer.page.locator('[data-testid="cache-key-row"] [data-testid="cache-delete"]').first().waitFor();
    assert.equal(await writer.page.getByTestId("cache-clear").count(), 0, "clearing a level is an admin's");
    assert.equal(await writer.page.locator('[data-write="admin"]').count(), 0);
    assertNoErrors(writer);
    await writer.close();

    const admin = await openPage(browser, secure, "#/queues");
    await signIn(admin, keys.admin, "admin");
    const all = await writeButtons(admin.page);
    for (const page of ["schedules", "dead", "cache", "task"]) {
      assert.ok(all[page] > 0, `an admin sees write buttons on ${page}: ${JSON.stringify(all)}`);
    }
    assertNoErrors(admin);
    await admin.close();
  });
});
