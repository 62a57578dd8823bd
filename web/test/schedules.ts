//! The schedules page: next fire times, last run and its task's page, pause,
//! resume and trigger.

import assert from "node:assert/strict";
import { before, test } from "node:test";
import type { Browser } from "playwright-core";
import { grpcurl, openPage, screenshot, type Koo } from "./harness";
import { assertNoErrors, shared, taskState } from "./helpers";

/** Registers the tests (inside the caller's describe). */
export function scheduleTests(): void {
  let koo: Koo;
  let browser: Browser;
  before(() => ({ koo, browser } = shared()));

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
}
