//! The dashboard in a real headless Chromium against a real koo: every page
//! loads without console errors, a task submitted with grpcurl shows up in the
//! live feed and its progress bar moves, Cancel ends it, the cache charts follow
//! Sets and Gets, the schedules page acts on schedules, and with a keys file
//! the page asks for a key and shows write buttons only to the roles allowed.
//! Screenshots of every page go to target/dashboard-screenshots/.
//!
//! One koo (open) and one browser serve every test but the auth ones, which
//! share a second koo started with KOO_AUTH_FILE.

import { describe } from "node:test";
import { authTests } from "./auth";
import { cacheTests } from "./cache";
import { useShared } from "./helpers";
import { pageTests, screenshotTests } from "./pages";
import { scheduleTests } from "./schedules";
import { taskTests } from "./tasks";

useShared();

describe("the open dashboard", () => {
  pageTests();
  taskTests();
  cacheTests();
  scheduleTests();
  screenshotTests();
});

describe("the dashboard with API keys (KOO_AUTH_FILE)", () => {
  authTests();
});
