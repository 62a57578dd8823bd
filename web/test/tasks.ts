//! Tasks: a task submitted with grpcurl in the live feed, its page's progress
//! bar, Cancel and Retry; dead letters requeued one and all.

import assert from "node:assert/strict";
import { before, test } from "node:test";
import type { Browser } from "playwright-core";
import { grpcurl, openPage, screenshot, submitTask, waitUntil, type Koo } from "./harness";
import { assertNoErrors, attrUntil, clickConfirmed, live, shared, taskState, textUntil } from "./helpers";

const SLEEP = "koo.diagnostics.sleep";

/** Registers the tests (inside the caller's describe). */
export function taskTests(): void {
  let koo: Koo;
  let browser: Browser;
  before(() => ({ koo, browser } = shared()));

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

  test("a feed link may name its filters (category=research) and a bad one is no filter, not an error", async () => {
    const p = await openPage(browser, koo, "#/tasks?category=research&state=nonsense");
    const { page } = p;
    await live(page);
    const chosen = (id: string) =>
      page.getByTestId(id).evaluate((el) => (el as HTMLSelectElement).selectedOptions[0]?.textContent ?? "");
    assert.equal(await chosen("feed-category"), "research");
    await page.waitForURL("**#/tasks?category=*");
    assert.ok(!page.url().includes("state="), page.url());
    assertNoErrors(p);
    await p.close();
  });

  test("the task page shows a task's expiry and debounce key", async () => {
    const expiring = await submitTask(koo, {
      name: "test.web.never-served",
      category: "TASK_CATEGORY_DATABASE",
      expireAfter: "3600s",
    });
    const debounced = await submitTask(koo, {
      name: "test.web.never-served",
      category: "TASK_CATEGORY_DATABASE",
      debounceKey: "report-42",
      debounceWindow: "3600s",
    });
    const p = await openPage(browser, koo, `#/tasks/${expiring}`);
    const { page } = p;
    await textUntil(page, '[data-testid="task-expires"]', (t) => t.includes("CANCELLED"), "the expiry on the task page");
    assert.equal(await page.getByTestId("task-debounce-key").count(), 0);
    await page.goto(new URL(`#/tasks/${debounced}`, page.url()).toString());
    await textUntil(page, '[data-testid="task-debounce-key"]', (t) => t === "report-42", "the debounce key on the task page");
    for (const id of [expiring, debounced]) await grpcurl(koo, "koo.tasks.v1.TaskService/CancelTask", { taskId: id });
    assertNoErrors(p);
    await p.close();
  });

  test("queues: Pause holds a queue's new tasks until Resume", async () => {
    const p = await openPage(browser, koo, "#/queues");
    const { page } = p;
    const row = '[data-testid="queue-row"][data-queue="health_check"]';
    const state = async () =>
      (await grpcurl(koo, "koo.tasks.v1.TaskService/ListQueues", {})).queues.find((q: { name: string }) => q.name === "health_check")?.state;
    await page.locator(`${row} [data-testid="queue-pause"]`).click();
    await page.locator(`${row}[data-paused="true"]`).waitFor();
    await waitUntil("health_check to be paused", async () => ((await state()) === "QUEUE_STATE_PAUSED" ? true : undefined));
    const held = await submitTask(koo, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_HEALTH_CHECK", kwargs: { result: "held" } });
    // The submit woke a built-in slot on health_check at once (koo's
    // wake-on-submit); a task of another queue submitted after it and run to
    // its end is the barrier: had the pause not held, the held task would
    // have started before it.
    const barrier = await submitTask(koo, { name: "koo.diagnostics.echo", category: "TASK_CATEGORY_RESEARCH", kwargs: { result: "barrier" } });
    await waitUntil(`${barrier} to succeed`, async () =>
      (await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: barrier })).task.state === "TASK_STATE_SUCCEEDED" ? true : undefined,
    );
    const waiting = (await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: held })).task;
    assert.equal(waiting.state, "TASK_STATE_QUEUED", "the paused queue's task waits");

    await page.locator(`${row} [data-testid="queue-resume"]`).waitFor();
    const resumedAt = Date.now();
    await page.locator(`${row} [data-testid="queue-resume"]`).click();
    await page.locator(`${row}[data-paused="false"]`).waitFor();
    const task = await waitUntil(`${held} to run once resumed`, async () => {
      const t = (await grpcurl(koo, "koo.tasks.v1.TaskService/GetTask", { taskId: held })).task;
      return t.state === "TASK_STATE_SUCCEEDED" ? t : undefined;
    });
    assert.ok(Date.parse(task.startTime) >= resumedAt - 50, `it started (${task.startTime}) after the resume (${new Date(resumedAt).toISOString()})`);
    assert.equal(await state(), "QUEUE_STATE_RUNNING");
    assertNoErrors(p);
    await p.close();
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
}
