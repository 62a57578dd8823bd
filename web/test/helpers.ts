//! What the browser tests share: the koo and the browser every suite uses
//! (started once, see `useShared`), and waits that name what they saw last
//! when they time out.

import assert from "node:assert/strict";
import { after, afterEach, before } from "node:test";
import type { Browser, Page } from "playwright-core";
import { closeLeftPages, launchBrowser, numberIn, startKoo, waitUntil, type Koo, type WatchedPage } from "./harness";

let koo: Koo | undefined;
let browser: Browser | undefined;

/** The shared koo (open: no keys) and browser; valid inside tests and hooks. */
export function shared(): { koo: Koo; browser: Browser } {
  if (!koo || !browser) throw new Error("the shared koo and browser are not started (useShared)");
  return { koo, browser };
}

/** Starts the shared koo and browser before the tests, stops them after; a failed test's pages are saved and closed. */
export function useShared(): void {
  before(async () => {
    // A short lease: the built-in pool announces what it runs every third of
    // one, so the workers page's figures follow the tests' tasks within a second.
    [koo, browser] = await Promise.all([startKoo({ name: "koo", env: { KOO_TASK_LEASE: "3s" } }), launchBrowser()]);
  });
  afterEach(async (t) => {
    await closeLeftPages(t.name);
  });
  after(async () => {
    await browser?.close();
    await koo?.stop();
  });
}

/** Resolves once the first element's text (trimmed) satisfies `ok`; a timeout names the last text seen. */
export async function textUntil(page: Page, selector: string, ok: (text: string) => boolean, what: string): Promise<string> {
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
export async function live(page: Page): Promise<void> {
  await textUntil(page, '[data-testid="conn-status"]', (t) => t === "live", "the connection badge to say live");
}

/** Waits until the task page's state says `state`. */
export async function taskState(page: Page, state: string): Promise<void> {
  await textUntil(page, '[data-testid="task-state"]', (t) => t === state, `the task page to say ${state}`);
}

/** The test's page must not have logged a console error or thrown. */
export function assertNoErrors(p: WatchedPage): void {
  assert.deepEqual(p.errors, [], "the page logged errors");
}

/** Clicks a button; a confirming one (data-armed) is clicked a second time. */
export async function clickConfirmed(page: Page, selector: string): Promise<void> {
  await page.locator(selector).click();
  // a confirming button is armed now; a plain one may already be gone
  const armed = page.locator(`${selector}[data-armed="true"]`);
  if ((await armed.count()) > 0) await armed.click();
}

/** Resolves with the attribute's value once `ok` accepts it. */
export async function attrUntil(page: Page, selector: string, attr: string, ok: (v: string) => boolean, what: string): Promise<string> {
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

export async function textNumber(page: Page, testid: string): Promise<number> {
  return numberIn(await page.getByTestId(testid).textContent());
}
