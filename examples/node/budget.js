// What an app shows its user when api-key-server refuses a request on a daily budget
// (429 budget_exceeded, type insufficient_quota), with the official `openai` npm package
// (the Node twin of examples/python/budget.py):
//
// - The SDK does not retry it: it retries a 429 by default, but the proxy sends
//   `x-should-retry: false` and the SDK obeys that header. So maxRetries can stay at its
//   default (2): other 429s (rate_limit_exceeded) are still retried, this one is not.
// - The app tells the user when the budget comes back: Retry-After counts the seconds
//   until the next midnight in the proxy's DAY_TIMEZONE.
// - The proxy admits a request only if its worst case fits what is left (the body's size
//   plus max_tokens of output): near the end of a budget a short request may pass while a
//   long one is refused. Asking for fewer tokens is what the user can do today.
// - While under budget, x-budget-limit-usd and x-budget-remaining-usd come with every
//   answer (`.withResponse()` reads them).
//
// Environment:
//   PROXY_BUDGET_URL, PROXY_BUDGET_JWT
//       a proxy whose user has a daily budget
//       that fits a request with max_tokens 16 but not one with max_tokens 2048
//       (DAILY_BUDGET_USD=0.001 with gpt-4o-mini at $0.15/$0.60 per 1M tokens)
//
// Exits non-zero on any failure.
'use strict';
const OpenAI = require('openai');

const messages = [{ role: 'user', content: 'Say hello' }];

/** The sentence to show the user for a budget refusal; null for any other error. */
function budgetMessage(error) {
  if (!(error instanceof OpenAI.APIError) || error.code !== 'budget_exceeded') return null;
  const seconds = Number(error.headers?.get('retry-after') ?? 0);
  const wait = Math.ceil(seconds / 60); // whole minutes, rounded up: never sooner than the proxy said
  const [hours, minutes] = [Math.floor(wait / 60), wait % 60];
  const back = new Date(Date.now() + wait * 60_000).toLocaleTimeString([], {
    hour: '2-digit',
    minute: '2-digit',
    hourCycle: 'h23',
  });
  return (
    "You have used today's AI allowance for requests this long. Try a shorter one, " +
    `or come back in ${hours} h ${String(minutes).padStart(2, '0')} min (at ${back} your time).`
  );
}

function check(condition, what) {
  if (!condition) throw new Error(what);
}

async function main() {
  let attempts = 0;
  const sdk = new OpenAI({
    baseURL: process.env.PROXY_BUDGET_URL.replace(/\/+$/, '') + '/v1',
    apiKey: process.env.PROXY_BUDGET_JWT,
    timeout: 30_000, // maxRetries stays at the SDK's default (2): see above
    fetch: (url, init) => {
      attempts += 1;
      return fetch(url, init);
    },
  });

  // A short request fits: the answer says how much of the budget was left before it.
  const { data: reply, response } = await sdk.chat.completions
    .create({ model: 'gpt-4o-mini', messages, max_tokens: 16 })
    .withResponse();
  const limit = response.headers.get('x-budget-limit-usd');
  const remaining = response.headers.get('x-budget-remaining-usd');
  check(reply.choices[0].message.content, 'no reply to the short request');
  check(limit !== null && remaining !== null, 'no x-budget-* headers on the answer');
  console.log(`short request answered; budget $${limit}, $${remaining} left before it`);

  // A long one's worst case does not fit: refused, and not retried.
  attempts = 0;
  try {
    await sdk.chat.completions.create({ model: 'gpt-4o-mini', messages, max_tokens: 2048 });
    throw new Error('a request beyond the budget was admitted');
  } catch (error) {
    const message = budgetMessage(error);
    check(message !== null, `expected budget_exceeded, got ${error}`);
    check(error instanceof OpenAI.RateLimitError, `expected RateLimitError, got ${error.constructor.name}`);
    check(error.type === 'insufficient_quota', `type ${error.type}`);
    check(error.headers.get('x-should-retry') === 'false', 'x-should-retry is not false');
    check(Number(error.headers.get('retry-after')) >= 1, 'no Retry-After');
    check(attempts === 1, `budget_exceeded was retried: ${attempts} attempts`);
    console.log(`429 budget_exceeded, 1 attempt; the app shows: ${message}`);
  }
}

main().catch((error) => {
  console.error(`FAILED: ${error.message}`);
  process.exit(1);
});
