// The schedules view (owned by web-b): next fire times, last run,
// pause / resume / trigger.
import { PageHead } from "../ui/components";

export function SchedulesView() {
  return <PageHead title="Schedules" />;
}
