// A frontend written from the README against the generated types: it must compile with
// `tsc --strict` and no casts. CI regenerates generated/unblock.d.ts from openapi/openapi.json.
import createClient from "openapi-fetch";
import type { components, paths } from "./generated/unblock";

type BlockedRun = components["schemas"]["BlockedRunOut"];
type Problem = components["schemas"]["Problem"];
type State = components["schemas"]["State"];

export function unblock(baseUrl: string, token: string) {
  return createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });
}

/** What a person sees after choosing a plan. */
export async function choosePlan(
  api: ReturnType<typeof unblock>,
  blockedRunId: string,
  planId: string,
): Promise<string> {
  const { data, error, response } = await api.POST(
    "/v1/blocked-runs/{blocked_run_id}/choose-plan",
    { params: { path: { blocked_run_id: blockedRunId } }, body: { plan_id: planId } },
  );
  if (error !== undefined) {
    return explain(error);
  }
  if (response.status === 202) {
    // Recorded; Mosaic is still answering. The body is the run, pending.
    return data.pending ? "Working on it…" : `Now ${data.state}`;
  }
  if (data.state === "awaiting_checkout" && data.checkout_url !== null) {
    return `Pay at ${data.checkout_url}`;
  }
  return `Now ${data.state}`;
}

/** Problems carry a stable code a frontend switches on. */
export function explain(problem: Problem): string {
  switch (problem.code) {
    case "invalid_state":
    case "decision_in_progress":
      return `Not now (${problem.state ?? "?"}); you may: ${(problem.actions ?? []).join(", ")}`;
    case "plan_not_offered":
      return "That plan is not on offer.";
    case "validation_error":
      return (problem.errors ?? []).map((e) => `${e.loc.join(".")}: ${e.msg}`).join("; ");
    case "missing_token":
    case "invalid_token":
    case "token_expired":
      return "Please sign in again.";
    default:
      return problem.detail;
  }
}

/** Auto top-up: `threshold` and `quantity` are required exactly when enabling. */
export async function answerTopup(
  api: ReturnType<typeof unblock>,
  blockedRunId: string,
  enable: boolean,
): Promise<BlockedRun | Problem> {
  const body = enable
    ? { enable: true as const, threshold: 100, quantity: 1000 }
    : { enable: false as const };
  const { data, error } = await api.POST("/v1/blocked-runs/{blocked_run_id}/topup", {
    params: { path: { blocked_run_id: blockedRunId } },
    body,
  });
  return error ?? data;
}

/** The runs waiting on a person, with the plans on offer typed. */
export async function waiting(api: ReturnType<typeof unblock>): Promise<string[]> {
  const states: State[] = ["awaiting_choice", "awaiting_checkout", "topup_prompt"];
  const { data, error } = await api.GET("/v1/blocked-runs", {
    params: { query: { state: states, limit: 50 } },
  });
  if (error !== undefined) {
    return [explain(error)];
  }
  return data.items.map((run) => {
    const cheapest = (run.plans ?? []).map((plan) => plan.price_usd ?? 0).sort()[0];
    return `${run.run_id}: ${run.state} (${run.actions.join("/")}) from $${cheapest ?? "?"}`;
  });
}

/** The run's live state: `state` events whose data is the run. */
export function follow(baseUrl: string, blockedRunId: string, onRun: (run: BlockedRun) => void) {
  // EventSource cannot send headers: a browser app proxies the token (or uses a cookie).
  const source = new EventSource(`${baseUrl}/v1/blocked-runs/${blockedRunId}/events`);
  source.addEventListener("state", (event: MessageEvent<string>) => {
    const run: BlockedRun = JSON.parse(event.data);
    onRun(run);
  });
  return source;
}
