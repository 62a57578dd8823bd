//! With a keys file (KOO_AUTH_FILE): the page asks for a key, a bad key shows
//! koo's refusal, and write buttons show only to the roles that may use them.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { Browser, Page } from "playwright-core";
import { grpcurl, keysFile, newKey, openPage, startKoo, submitTask, waitUntil, type Koo, type WatchedPage } from "./harness";
import { assertNoErrors, live, shared, taskState, textUntil } from "./helpers";

/** Registers the tests (inside the caller's describe); they start a koo of their own. */
export function authTests(): void {
  let browser: Browser;
  let secure: Koo;
  const keys: Record<"admin" | "writer" | "reader", string> = { admin: "", writer: "", reader: "" };
  let deadTask = "";

  before(async () => {
    browser = shared().browser;
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
    // each with its content in: the rows that carry (or would carry) buttons
    const content: Record<string, string> = {
      queues: '[data-testid="queue-row"][data-queue="research"]',
      workers: "main table tbody tr:not(.empty)",
      tasks: `[data-testid="feed-row"][data-task-id="${deadTask}"]`,
    };
    for (const [route, rows] of Object.entries(content)) {
      await page.getByTestId(`nav-${route}`).click();
      await page.locator(`[data-testid="nav-${route}"][aria-current="page"]`).waitFor();
      await page.locator(rows).first().waitFor();
      out[route] = await count();
    }
    return out;
  }

  test("the page asks for a key, and a bad key shows koo's refusal", async () => {
    const p = await openPage(browser, secure, "#/schedules");
    const { page } = p;
    await page.getByTestId("key-prompt").waitFor();
    // refused streams are not "live"
    await textUntil(page, '[data-testid="conn-status"]', (t) => t === "refused", "the badge to say refused");
    // what a refused stream never told reads "–", not 0
    await page.getByTestId("nav-queues").click();
    await page.locator('[data-testid="nav-queues"][aria-current="page"]').waitFor();
    for (const stat of ["stat-queued", "stat-running"]) {
      assert.equal(await page.getByTestId(stat).locator(".stat-value").textContent(), "–", `${stat} of a refused stream`);
    }
    await page.getByTestId("api-key-input").waitFor();
    await page.getByTestId("api-key-input").fill("koo_not-a-key");
    await page.getByTestId("api-key-save").click();
    await page.getByText(/not in the keys file/).first().waitFor();
    assert.ok(await page.getByTestId("key-prompt").isVisible(), "the prompt stays");
    assert.equal(await page.locator("[data-write]").count(), 0);
    assertNoErrors(p);
    await p.close();
  });

  test("a reader sees no write button on any page; a writer gets delete but not clear; an admin gets them all", async () => {
    const reader = await openPage(browser, secure, "#/queues");
    await signIn(reader, keys.reader, "reader");
    // the key lives in this tab's sessionStorage, never in a cookie: a reload keeps it
    assert.deepEqual(await reader.context.cookies(), []);
    await reader.page.reload();
    await reader.page.getByTestId("caller").filter({ hasText: "reader" }).waitFor();
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
    for (const page of ["queues", "schedules", "dead", "cache", "task"]) {
      assert.ok(all[page] > 0, `an admin sees write buttons on ${page}: ${JSON.stringify(all)}`);
    }
    assertNoErrors(admin);
    await admin.close();
  });
}
