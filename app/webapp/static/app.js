// The reference web app for unblock: what a product's own frontend does, in one small file.
// It uses only what any client may use: a bearer token, the JSON API and the event stream.
// No framework, no build step, no inline code (it runs under `default-src 'self'`).
"use strict";

const API = ""; // same origin here; a product sets its unblock URL (and UNBLOCK_CORS_ORIGINS)
const TOKEN_KEY = "unblock.token";
const TERMINAL = new Set(["resumed", "cancelled", "failed", "expired"]);
const $ = (id) => document.getElementById(id);

const RUN_WORDS = {
  checking_plan: "Checking the organization's plan with Mosaic",
  awaiting_choice: "Waiting for a plan to be chosen",
  awaiting_checkout: "Waiting for the checkout to be paid",
  topup_prompt: "Waiting for the auto top-up answer",
  resuming: "Resuming in Mosaic",
  resumed: "Running again",
  cancelled: "Cancelled",
  failed: "Stopped",
  expired: "Expired: nobody answered in time",
};
const DECISION_WORDS = {
  idle: "Nothing to decide right now.",
  checking_plan: "Checking your organization's plan with Mosaic…",
  awaiting_choice: "Your organization is on no paid plan. Choose one to get its runs going.",
  awaiting_checkout: "A checkout is open for the {plan} plan.",
  topup_prompt: "Your organization is on the {plan} plan. One last question: auto top-up.",
  decided: "Decided: the {plan} plan, auto top-up {topup}.",
};
// What a person can do about each problem code (problem+json `code`, or a stored `error`).
const TODO = {
  missing_token: "Sign in with your access token.",
  invalid_token: "This token is not valid here. Sign in again with a fresh one.",
  token_expired: "Your token has expired. Sign in again with a fresh one.",
  missing_scope: "Your token may not do this. Ask for one with the runs:write scope.",
  no_account: "This token names no account. Ask for a token of your organization.",
  decision_in_progress: "A step is already under way. Wait a moment: this page updates itself.",
  nothing_waiting: "No run waits on this decision any more.",
  plan_not_offered: "Choose one of the plans shown.",
  checkout_incomplete: "Finish paying on the checkout page, then check again.",
  checkout_expired: "Choose a plan again to open a new checkout.",
  checkout_missing: "Choose the plan again.",
  upgrade_refused: "Choose another plan, or contact Mosaic's support.",
  topup_not_allowed: "This plan does not allow auto top-up. Answer “Not now”.",
  topup_refused: "Check the values, or answer “Not now”.",
  topup_over_spend_cap:
    "Change the quantity as the message says, answer “Not now”, or ask an admin to raise the cap.",
  topup_price_unknown: "Answer “Not now”, or ask an admin to clear the cap.",
  validation_error: "Check the values you entered.",
  mosaic_unavailable: "Mosaic could not be reached. Retry the run in a few minutes.",
  mosaic_rejected: "Mosaic refused a step. Retry the run, or contact support.",
  resume_refused: "Mosaic would not resume the run. Retry it, or look at it in Mosaic.",
  resume_limit_reached: "The run kept stopping for credits. Check the balance, then retry.",
  network: "Check your connection, then reload the page.",
};
const ASK_AGAIN = "Reload the page. If it happens again, contact support with this code.";

let token = null;
let org = null;
const runs = new Map(); // blocked run id → the run as last streamed
const streams = new Map(); // blocked run id → AbortController of its event stream
let orgReload = null;
let cancelledCheckout = null; // the checkout the person cancelled (Mosaic closed it)

class Problem extends Error {
  constructor(code, detail, status) {
    super(detail);
    this.code = code;
    this.status = status;
  }
}

async function call(method, path, body) {
  let res;
  try {
    res = await fetch(API + path, {
      method,
      headers: {
        Authorization: `Bearer ${token}`,
        ...(body ? { "Content-Type": "application/json" } : {}),
      },
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch {
    throw new Problem("network", "The service could not be reached.", 0);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    throw new Problem(data?.code ?? "error", data?.detail ?? `HTTP ${res.status}`, res.status);
  }
  return data;
}

// EventSource cannot send an Authorization header: read the stream with fetch and split the
// server-sent events ourselves (blank-line separated; `data:` lines; comments are pings).
async function follow(id) {
  if (streams.has(id)) return;
  const ctl = new AbortController();
  streams.set(id, ctl);
  try {
    const res = await fetch(`${API}/v1/blocked-runs/${id}/events`, {
      headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
      signal: ctl.signal,
    });
    if (!res.ok) return;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) onRun(JSON.parse(data));
      }
    }
  } catch (err) {
    if (err.name === "AbortError") return;
  } finally {
    if (streams.get(id) === ctl) streams.delete(id);
  }
  // The server ends the stream at a terminal state; any other end is a dropped connection.
  const run = runs.get(id);
  if (token && run && !TERMINAL.has(run.state)) setTimeout(() => follow(id), 2000);
}

function onRun(run) {
  runs.set(run.id, run);
  renderRuns();
  // A run's stream also speaks when its organization's decision moves: read the decision.
  clearTimeout(orgReload);
  orgReload = setTimeout(loadOrganization, 100);
}

async function loadOrganization() {
  try {
    org = await call("GET", "/v1/organization");
    renderOrganization();
  } catch (err) {
    showProblem(err);
  }
}

async function loadRuns() {
  const page = await call("GET", "/v1/blocked-runs?limit=100");
  for (const run of page.items) runs.set(run.id, run);
  renderRuns();
  for (const run of page.items) if (!TERMINAL.has(run.state)) follow(run.id);
}

// One action at a time: buttons are disabled while it is under way, and the answer (200 done,
// 202 under way: the streams report the rest) is shown as the new decision.
async function act(path, body, busyText) {
  hideProblem();
  setBusy(true);
  say(busyText);
  try {
    const answer = await call("POST", path, body);
    if (path.startsWith("/v1/organization")) {
      org = answer;
      renderOrganization();
      // The button pressed may now be hidden: keep the keyboard where the decision is told.
      $("decision-summary").focus();
    } else {
      onRun(answer);
    }
    const now = answer.run_id
      ? `Run ${answer.run_id}: ${RUN_WORDS[answer.state] ?? answer.state}.`
      : describe(answer);
    say(answer.pending ? "Sent. Waiting for Mosaic…" : now);
    return answer;
  } catch (err) {
    say("");
    showProblem(err);
    // A refusal (409) often means the decision moved meanwhile: show it as it is now.
    if (err.status === 409) loadOrganization();
    return null;
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  for (const b of document.querySelectorAll("main button")) b.disabled = busy;
  $("main").setAttribute("aria-busy", String(busy));
}

function say(text) {
  $("notice").textContent = text;
}

function showProblem(err) {
  if (err.status === 401) signOut();
  $("problem-detail").textContent = `${err.message} (${err.code})`;
  $("problem-todo").textContent = TODO[err.code] ?? ASK_AGAIN;
  $("problem").hidden = false;
  $("problem").focus();
}

function hideProblem() {
  $("problem").hidden = true;
}

function money(usd) {
  const cents = { minimumFractionDigits: 2, maximumFractionDigits: 2 };
  return `$${Number(usd).toLocaleString("en-US", cents)}`;
}

function count(n) {
  return Number(n).toLocaleString("en-US");
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function describe(d) {
  const plan = d.plan?.id ?? d.chosen_plan_id ?? "chosen";
  return (DECISION_WORDS[d.state] ?? d.state)
    .replace("{plan}", plan)
    .replace("{topup}", d.topup?.enabled ? "on" : "off");
}

function renderOrganization() {
  const d = org;
  $("decision").hidden = false;
  $("decision-summary").textContent = describe(d);
  if (d.runs_waiting > 0) {
    const runsText = d.runs_waiting === 1 ? "1 run waits" : `${d.runs_waiting} runs wait`;
    $("decision-summary").textContent += ` ${runsText} on this decision.`;
  }
  $("decision-pending").hidden = !d.pending;
  const error = $("decision-error");
  error.hidden = !d.error;
  if (d.error) {
    $("decision-error-detail").textContent = `${d.error.message} (${d.error.code})`;
    $("decision-error-todo").textContent = TODO[d.error.code] ?? ASK_AGAIN;
  }
  // While a checkout is open, another plan may replace it (the open one is left out).
  const cancelled = d.checkout_url != null && d.checkout_url === cancelledCheckout;
  const checkingOut = d.state === "awaiting_checkout" && !cancelled;
  $("choose").hidden = !d.actions.includes("choose_plan");
  $("choose-title").textContent = checkingOut ? "Or choose another plan" : "Choose a plan";
  $("choose-intro").hidden = checkingOut;
  if (cancelled) {
    $("decision-summary").textContent = "The checkout was cancelled. Choose a plan to start again.";
  }
  $("checkout").hidden = !checkingOut;
  $("topup").hidden = !d.actions.includes("topup");
  $("confirm").disabled = d.pending;
  if (d.checkout_url) $("checkout-link").href = d.checkout_url;
  renderPlans(d);
  renderCost();
}

function renderPlans(d) {
  const list = $("plans");
  list.replaceChildren();
  for (const p of d.plans ?? []) {
    if (d.state === "awaiting_checkout" && p.id === d.chosen_plan_id) continue;
    const item = el("li", undefined, "plan");
    item.append(el("h4", p.id));
    const period = p.billing === "annual" ? "year" : "month";
    const facts = el("dl");
    const add = (term, value) => facts.append(el("dt", term), el("dd", value));
    if (p.price_usd != null) add("Price", `${money(p.price_usd)} a ${period}`);
    if (p.credits_per_month != null) add("Credits", `${count(p.credits_per_month)} a month`);
    if (p.top_up_rate_per_100_credits_usd != null) {
      add("Top-ups", `${money(p.top_up_rate_per_100_credits_usd)} per 100 credits`);
    }
    item.append(facts);
    if (p.notes) item.append(el("p", p.notes, "notes"));
    const choose = el("button", `Choose ${p.id}`);
    choose.type = "button";
    choose.addEventListener("click", () =>
      act("/v1/organization/choose-plan", { plan_id: p.id }, `Choosing ${p.id}…`),
    );
    item.append(choose);
    list.append(item);
  }
}

// The top-up question with its price: the same arithmetic as the service's spend guard.
function renderCost() {
  const price = org?.topup_price;
  const threshold = Number($("threshold").value);
  const quantity = Number($("quantity").value);
  const cap = org?.monthly_topup_cap_usd;
  if (!price) {
    $("topup-cost").textContent = "Mosaic listed no top-up rate for this plan.";
  } else if (quantity > 0) {
    const one = (quantity / 100) * price.rate_per_100_credits_usd;
    const monthly = price.credits_per_month;
    const times = monthly ? Math.max(1, Math.ceil(monthly / quantity)) : 1;
    $("topup-cost").textContent =
      `When the balance falls below ${count(threshold)} credits, Mosaic buys ` +
      `${count(quantity)} credits for ${money(one)} (${money(price.rate_per_100_credits_usd)} ` +
      `per 100). A month that uses the plan's credits over again takes ${times} ` +
      `top-up${times === 1 ? "" : "s"}: ${money(one * times)}.`;
  } else {
    $("topup-cost").textContent = "Enter how many credits to buy.";
  }
  $("topup-cap").textContent =
    cap == null
      ? "No spending cap is set for auto top-up."
      : `Your account caps auto top-up at ${money(cap)} a month: ` +
        "settings that could cost more are refused.";
}

function renderRuns() {
  const list = $("runs");
  list.replaceChildren();
  const sorted = [...runs.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  $("runs-section").hidden = false;
  $("runs-empty").hidden = sorted.length > 0;
  for (const run of sorted) {
    const item = el("li", undefined, `run state-${run.state}`);
    item.dataset.state = run.state;
    const title = el("p", undefined, "run-title");
    title.append(el("span", "Run "), el("code", run.run_id));
    if (run.agent_id) title.append(el("span", ` · ${run.agent_id}`, "agent"));
    item.append(title);
    const words = RUN_WORDS[run.state] ?? run.state;
    const busy = run.pending && !TERMINAL.has(run.state);
    item.append(el("p", busy ? `${words}…` : words, "run-state"));
    if (run.error && TERMINAL.has(run.state)) {
      item.append(el("p", `${run.error.message} ${TODO[run.error.code] ?? ""}`, "run-error"));
    }
    for (const action of ["retry", "cancel"]) {
      if (!run.actions.includes(action)) continue;
      const button = el("button", action === "retry" ? "Retry" : "Cancel", "secondary small");
      button.type = "button";
      button.setAttribute("aria-label", `${button.textContent} run ${run.run_id}`);
      button.addEventListener("click", async () => {
        const answer = await act(`/v1/blocked-runs/${run.id}/${action}`, null, "Sending…");
        if (answer && !TERMINAL.has(answer.state)) follow(answer.id);
      });
      item.append(button);
    }
    list.append(item);
  }
}

function signOut() {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const ctl of streams.values()) ctl.abort();
  streams.clear();
  runs.clear();
  $("decision").hidden = true;
  $("runs-section").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
}

async function start() {
  $("sign-in").hidden = true;
  $("sign-out").hidden = false;
  try {
    await Promise.all([loadOrganization(), loadRuns()]);
  } catch (err) {
    showProblem(err);
    return;
  }
  // Back from the hosted checkout (its success_url / cancel_url point here).
  const params = new URLSearchParams(location.search);
  const back = params.get("checkout");
  if (back) history.replaceState(null, "", location.pathname);
  if (back === "paid" && org?.actions.includes("confirm_checkout")) {
    const checking = "Welcome back. Checking the payment with Mosaic…";
    await act("/v1/organization/confirm-checkout", null, checking);
  } else if (back === "cancelled") {
    cancelledCheckout = org?.checkout_url ?? null;
    renderOrganization();
    say("The checkout was cancelled; nothing was charged. Choose a plan below to start again.");
  }
}

function init() {
  // `unblock dev` signs in through the fragment (#token=…), which never reaches a server.
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromFragment) {
    sessionStorage.setItem(TOKEN_KEY, fromFragment);
    history.replaceState(null, "", location.pathname + location.search);
  }
  token = sessionStorage.getItem(TOKEN_KEY);
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    hideProblem();
    start();
  });
  $("sign-out").addEventListener("click", () => {
    signOut();
    say("Signed out.");
  });
  $("confirm").addEventListener("click", () =>
    act("/v1/organization/confirm-checkout", null, "Checking the payment with Mosaic…"),
  );
  $("topup").addEventListener("submit", (event) => {
    event.preventDefault();
    const threshold = Number($("threshold").value);
    const quantity = Number($("quantity").value);
    act("/v1/organization/topup", { enable: true, threshold, quantity }, "Turning on auto top-up…");
  });
  $("decline-topup").addEventListener("click", () =>
    act("/v1/organization/topup", { enable: false }, "Going on without auto top-up…"),
  );
  $("threshold").addEventListener("input", renderCost);
  $("quantity").addEventListener("input", renderCost);
  if (token) start();
  else $("sign-in").hidden = false;
}

init();
