import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import type { Browser } from "playwright-core";
import { launchBrowser, openPage, screenshot, startKoo, type Koo } from "./harness";

let koo: Koo;
let browser: Browser;
before(async () => {
  [koo, browser] = await Promise.all([startKoo(), launchBrowser()]);
});
after(async () => {
  await browser?.close();
  await koo?.stop();
});
describe("smoke", () => {
  test("loads", async () => {
    const p = await openPage(browser, koo);
    await p.page.waitForSelector("#app");
    await screenshot(p.page, "smoke");
    await p.close();
    assert.deepEqual(p.errors, []);
  });
});
